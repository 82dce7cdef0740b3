"""``memloc localize``: memorized-weight masks (eq. 5-7) of prompt subsets from a statistics file."""

from __future__ import annotations

import argparse

from ..localize import localize
from ._args import add_subset_mask_args, subset_mask_options


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
    add_subset_mask_args(parser, out_help="mask file to write (.safetensors)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = localize(args.stats, args.out, **subset_mask_options(args))
    print(f"wrote {path}")
    return 0
