"""``memloc generate``: images from the original and the pruned model with the same seeds, as a PNG grid."""

from __future__ import annotations

import argparse

from ..cli import add_common_args
from ..collect import SCHEDULERS
from ..generate import generate
from ._args import resolution


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images before and after pruning, as a PNG grid",
        description=(
            "Generate one image per prompt and seed with the original model and, with --mask, with the mask "
            "applied (same seeds); write them as a grid: one row per (prompt, seed), columns original and pruned."
        ),
    )
    add_common_args(parser)
    parser.add_argument("--prompts", required=True, help="prompt file: .txt, .jsonl or .csv")
    parser.add_argument("--out", required=True, help="grid image to write (.png)")
    parser.add_argument("--mask", default=None, help="mask file to compare against (default: original only)")
    parser.add_argument("--subset-index", type=int, default=None, metavar="I",
                        help="use subset I of the mask file (default: the union of all subsets)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default 7.5)")
    parser.add_argument("--resolution", type=resolution, default=None, help="SIZE or HxW pixels (default: the model's)")
    parser.add_argument("--scheduler", default=None, help=f"{', '.join(SCHEDULERS)} (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = generate(
        args.prompts,
        args.out,
        model=args.model,
        mask=args.mask,
        subset=args.subset_index,
        seeds=args.seeds,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        scheduler=args.scheduler,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
    )
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0
