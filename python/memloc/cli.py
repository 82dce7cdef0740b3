"""The ``memloc`` command: one subcommand per stage of the data flow.

prompts -> ``collect`` (statistics) -> ``localize`` (masks) -> ``prune`` (pruned model) ->
``generate`` / ``attack`` / ``eval`` (evaluation); ``analyze`` draws density and IoU; ``train``
makes a memorizing model; ``demo`` runs the whole job on the embedded model.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import __version__
from .errors import MemlocError

# In the order of the data flow; a module that does not exist yet is skipped.
SUBCOMMANDS = ("demo", "collect", "localize", "prune", "analyze", "generate", "attack", "eval", "train")


def add_common_args(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """The flags every model-facing subcommand shares."""
    if model:
        parser.add_argument(
            "--model",
            default=None,
            help="local diffusers pipeline folder (default: the embedded memorizing model)",
        )
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype", default=None, choices=("float16", "bfloat16", "float32"),
        help="compute dtype (default: float16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--backend", default="auto", choices=("auto", "reference", "cpu", "triton", "cuda"),
        help="memloc_kernels backend for the statistics and masks (default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memloc",
        description="Find where a text-to-image diffusion model stores memorized images, and prune them.",
    )
    parser.add_argument("--version", action="version", version=f"memloc {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module_name = f"memloc.commands.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MemlocError as exc:
        print(f"memloc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memloc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # out of memory is an input-size problem, not a bug
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            print(f"memloc {args.command}: error: out of GPU memory; try a smaller --batch-size", file=sys.stderr)
            return 2
        if type(exc).__name__ == "BackendUnavailableError":  # --backend names one that cannot run here
            print(f"memloc {args.command}: error: --backend: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
