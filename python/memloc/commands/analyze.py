"""``memloc analyze``: density and pairwise IoU of subset masks per (timestep, layer), as CSV/JSON and plots."""

from __future__ import annotations

import argparse

from ..analyze import analyze
from ..cli import add_common_args
from ._args import add_localize_args, add_subset_args


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
    add_common_args(parser)
    parser.add_argument("--stats", required=True, help="statistics file from memloc collect")
    parser.add_argument("--out", required=True, help="output folder")
    add_localize_args(parser)
    add_subset_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = analyze(
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
