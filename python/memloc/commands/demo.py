"""``memloc demo``: the whole job on the embedded memorizing model, judged on held-out captions."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_common_args

DESCRIPTION = """\
Run memloc end to end on a model that really memorizes (default: the embedded model, 32 memorized
photos). The memorized captions are split by source photo into a localization half and a held-out
half (fixed seed); statistics are collected on the localization half only (conditional vs
unconditional branch), masks localized and the model pruned. The original model, the pruned model
and a control with as many random FFN weights pruned per layer then generate with the same seeds:
near copies of the training photos on held-out and localization captions, Carlini et al.'s
extraction attack on the held-out captions, attribute accuracy and diversity on generic captions.
Prints a before/after table and a verdict; writes table.md, demo.json, grid.png, grid_generic.png,
attack_per_prompt.csv, analysis/ (density and IoU plots), stats.safetensors and mask.safetensors
under --out. Nothing is tuned on the held-out half. See docs/DEMO.md.
"""


def add_parser(subparsers) -> None:
    from ..demo import (
        DEFAULT_GENERIC_SEEDS,
        DEFAULT_GUIDANCE,
        DEFAULT_SEEDS,
        DEFAULT_SPARSITY,
        DEFAULT_STEPS,
        DEFAULT_TAU,
        LOCALIZATION_STEPS,
        QUICK,
        SPLIT_SEED,
    )

    p = subparsers.add_parser(
        "demo",
        help="localize and prune memorization in the embedded model; before/after table on held-out captions",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.add_argument(
        "--out", default="memloc-demo", help="output folder, replaced when the run succeeds (default ./memloc-demo)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help=f"generations per memorized caption, also the attack's samples per held-out prompt "
        f"(default {DEFAULT_SEEDS}; --quick {QUICK['seeds']})",
    )
    p.add_argument(
        "--generic-seeds",
        type=int,
        default=None,
        metavar="M",
        help=f"generations per generic caption (default {DEFAULT_GENERIC_SEEDS}; --quick {QUICK['generic_seeds']})",
    )
    p.add_argument(
        "--sparsity",
        default=str(DEFAULT_SPARSITY),
        metavar="S",
        help=f"s, fraction of each row's weights ranked by eq. 5, or 'auto' to pick the smallest that "
        f"removes near copies on the localization half (default {DEFAULT_SPARSITY:g})",
    )
    p.add_argument(
        "--timesteps",
        type=int,
        default=DEFAULT_TAU,
        metavar="TAU",
        help=f"tau: localize on the first TAU+1 steps of the {LOCALIZATION_STEPS}-step DDIM schedule of the "
        f"statistics (default {DEFAULT_TAU})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"DDIM sampling steps (default {DEFAULT_STEPS}; --quick {QUICK['steps']})",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g})",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=SPLIT_SEED,
        help=f"seed of the localization/held-out split (default {SPLIT_SEED})",
    )
    p.add_argument("--no-control", action="store_true", help="skip the random-pruning control")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run (fewer steps and seeds) that finishes in a minute or two on a CPU",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DEFAULT_GENERIC_SEEDS, DEFAULT_SEEDS, DEFAULT_STEPS, QUICK, run_demo
    from ..errors import MemlocError

    if args.sparsity == "auto":
        sparsity = "auto"
    else:
        try:
            sparsity = float(args.sparsity)
        except ValueError:
            raise MemlocError(f"--sparsity must be a number in (0, 1] or 'auto', got {args.sparsity!r}") from None

    def pick(value, default, quick):
        return value if value is not None else (quick if args.quick else default)

    record = run_demo(
        args.out,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        seeds=pick(args.seeds, DEFAULT_SEEDS, QUICK["seeds"]),
        generic_seeds=pick(args.generic_seeds, DEFAULT_GENERIC_SEEDS, QUICK["generic_seeds"]),
        sparsity=sparsity,
        timesteps=args.timesteps,
        steps=pick(args.steps, DEFAULT_STEPS, QUICK["steps"]),
        guidance=args.guidance,
        split_seed=args.split_seed,
        random_control=not args.no_control,
    )
    print(
        f"wrote {args.out}/: table.md, demo.json, grid.png, grid_generic.png, analysis/ "
        f"({record['timings_s']['total']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    # the table ends with the verdict, so that it is the last line printed
    print(record["table"], end="")
    return 0
