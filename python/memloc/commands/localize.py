"""``memloc localize``: memorized-weight masks (eq. 5-7) of prompt subsets from a statistics file."""

from __future__ import annotations

import argparse

from ..cli import add_common_args
from ..localize import localize
from ._args import add_localize_args, add_subset_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "localize",
        help="compute memorized-weight masks of prompt subsets from statistics",
        description=(
            "For each prompt subset, sum its prompts' statistics and select, per FFN second-layer row, the "
            "weights among the top s of |W| * ||X|| that score above the null (eq. 5-6), united over the first "
            "tau+1 timesteps (eq. 7). Writes packed masks (safetensors). --model defaults to the model the "
            "statistics were collected on."
        ),
    )
    add_common_args(parser)
    parser.add_argument("--stats", required=True, help="statistics file from memloc collect")
    parser.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    add_localize_args(parser)
    add_subset_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = localize(
        args.stats,
        args.out,
        sparsity=args.sparsity,
        timesteps=args.timesteps,
        subset_files=args.subset,
        n_subsets=args.subsets,
        subset_size=args.subset_size,
        seed=args.seed,
        null=args.null,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
    )
    print(f"wrote {path}")
    return 0
