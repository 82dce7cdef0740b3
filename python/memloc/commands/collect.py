"""``memloc collect``: per-prompt FFN sums of squares over the first tau+1 denoising steps."""

from __future__ import annotations

import argparse

from ..cli import add_common_args
from ..collect import SCHEDULERS, collect_statistics
from ._args import resolution


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "collect",
        help="run the first tau+1 denoising steps and store FFN statistics per prompt",
        description=(
            "Denoise the prompts in batches with classifier-free guidance for the first tau+1 steps and store, "
            "per prompt, timestep and FFN layer, the sums of squares of the FFN hidden activations of the "
            "conditional and the unconditional branch, in one safetensors file. An interrupted run resumes "
            "from OUT.partial when rerun with the same arguments."
        ),
    )
    add_common_args(parser)
    parser.add_argument("--prompts", required=True, help="prompt file: .txt (one per line), .jsonl (caption), .csv")
    parser.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8; CFG doubles it)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps of the schedule (default 50)")
    parser.add_argument("--timesteps", type=int, default=10, metavar="TAU",
                        help="tau: collect the first TAU+1 steps (default 10)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default 7.5)")
    parser.add_argument("--resolution", type=resolution, default=None, help="SIZE or HxW pixels (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED+i (default 0)")
    parser.add_argument("--scheduler", default=None, help=f"{', '.join(SCHEDULERS)} (default: the model's)")
    parser.add_argument("--null", choices=("uncond", "empty"), default=None,
                        help="also run the empty prompt with each prompt's seed (empty); default: uncond only")
    parser.add_argument("--compat", choices=("authors",), default=None,
                        help="authors: reproduce the paper's released code (per-token L2-normalized activations, "
                             "both CFG halves pooled, empty-prompt null, one seed for all prompts)")
    parser.add_argument("--restart", action="store_true", help="discard an interrupted run's OUT.partial")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = collect_statistics(
        args.prompts,
        args.out,
        model=args.model,
        batch_size=args.batch_size,
        steps=args.steps,
        timesteps=args.timesteps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        seed=args.seed,
        scheduler=args.scheduler,
        null=args.null,
        compat=args.compat,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        restart=args.restart,
    )
    print(f"wrote {path}")
    return 0
