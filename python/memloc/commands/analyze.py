"""``memloc analyze``: density and pairwise IoU of subset masks per (timestep, layer), as CSV/JSON and plots."""

from __future__ import annotations

import argparse

from ..analyze import analyze
from ._args import add_subset_mask_args, subset_mask_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="mask density and IoU across prompt subsets per timestep and layer",
        description=(
            "For a collection of prompt subsets (e.g. --subsets 10 --subset-size 10), compute each subset's mask "
            "at every timestep t <= tau and the eq. 7 union, and write per (timestep, layer) the mean density and "
            "the mean pairwise IoU across subsets: analysis.csv, analysis.json, density.png, iou.png, "
            "union_by_layer.png."
        ),
    )
    add_subset_mask_args(parser, out_help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = analyze(args.stats, args.out, **subset_mask_options(args))
    print(f"wrote {path}")
    return 0
