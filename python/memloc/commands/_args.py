"""Argument types and option groups shared by the subcommands."""

from __future__ import annotations

import argparse
import re

from ..cli import add_common_args


def resolution(text: str) -> int | tuple[int, int]:
    """``512`` (square) or ``HEIGHTxWIDTH``."""
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels, got {text!r}")
    if match.group(2) is None:
        return int(match.group(1))
    return int(match.group(1)), int(match.group(2))


def add_subset_args(parser: argparse.ArgumentParser) -> None:
    """How to choose prompt subsets from a statistics file."""
    group = parser.add_argument_group("prompt subsets (default: one subset of all prompts)")
    group.add_argument("--subsets", type=int, default=None, metavar="N",
                       help="sample N subsets of --subset-size prompts")
    group.add_argument("--subset-size", type=int, default=None, metavar="M", help="prompts per sampled subset")
    group.add_argument("--seed", type=int, default=0, help="seed of the subset sampling (default 0)")
    group.add_argument(
        "--subset", action="append", default=None, metavar="FILE",
        help="a prompt file listing one subset (repeat for several); its prompts must be in the statistics",
    )


def add_localize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparsity", type=float, default=0.01, metavar="S",
                        help="fraction s of each row's weights ranked by eq. 5, in (0, 1] (default 0.01)")
    parser.add_argument("--timesteps", type=int, default=None, metavar="TAU",
                        help="use the first TAU+1 timesteps (default: all that were collected)")
    parser.add_argument("--null", choices=("uncond", "empty"), default=None,
                        help="null statistics: the unconditional branch (default) or the empty-prompt run")


def add_subset_mask_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The inputs of ``localize`` and ``analyze``: model options, --stats, --out and the masks' options."""
    add_common_args(parser)
    parser.add_argument("--stats", required=True, help="statistics file from memloc collect")
    parser.add_argument("--out", required=True, help=out_help)
    add_localize_args(parser)
    add_subset_args(parser)


def subset_mask_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``memloc.localize.localize`` and ``memloc.analyze.analyze`` from parsed flags."""
    return {
        "sparsity": args.sparsity,
        "timesteps": args.timesteps,
        "subset_files": args.subset,
        "n_subsets": args.subsets,
        "subset_size": args.subset_size,
        "seed": args.seed,
        "null": args.null,
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "backend": args.backend,
    }
