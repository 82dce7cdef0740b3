"""``memloc prune``: apply a mask file to a pipeline and save the pruned pipeline (or the packed mask)."""

from __future__ import annotations

import argparse

from ..cli import add_common_args
from ..prune import prune


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="zero the masked FFN weights of a pipeline and save it",
        description=(
            "Apply a mask file from memloc localize to the pipeline (by default the union of all its subsets) and "
            "save the pruned pipeline with save_pretrained, or with --mask-only just the packed mask to apply at "
            "load time (memloc.api.load_pruned). A mask made for another model is refused."
        ),
    )
    add_common_args(parser)
    parser.add_argument("--mask", required=True, help="mask file from memloc localize")
    parser.add_argument("--out", required=True, help="output pipeline folder (or mask file with --mask-only)")
    parser.add_argument("--mask-only", action="store_true", help="write only the packed mask (safetensors)")
    parser.add_argument("--subset-index", type=int, default=None, metavar="I",
                        help="prune subset I of the mask file (default: the union of all subsets)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = prune(
        args.mask,
        args.out,
        model=args.model,
        mask_only=args.mask_only,
        subset=args.subset_index,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
    )
    print(f"wrote {path}")
    return 0
