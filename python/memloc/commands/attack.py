"""``memloc attack``: Carlini et al.'s extraction attack before and after pruning (the paper's Table 1)."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from ..cli import add_common_args
from ..errors import MemlocError
from ..io import atomic_dir, check_apart

DESCRIPTION = """\
Run Carlini et al.'s extraction attack: per prompt, --samples generations with different seeds; a
graph joins two generations whose tiled L2 distance (max over a 4x4 grid of tiles of the tile's RMS
difference, 0..255 levels) is under --threshold; a prompt is identified as memorized when the graph
has a clique of --min-clique generations, and actually memorized when the clique's medoid is within
the threshold of an image in --training-images. With --mask or --pruned-model the pruned model is
attacked too, with the same seeds. Writes table1.{md,csv,json}, per_prompt.csv and cliques/*/*.png.
"""


def add_parser(subparsers) -> None:
    from ..eval.tiled_l2 import DEFAULT_GRID, PAPER_THRESHOLD

    p = subparsers.add_parser(
        "attack",
        help="extraction attack (identified / actually memorized prompts), before and after pruning",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    pruned = p.add_mutually_exclusive_group()
    pruned.add_argument("--mask", help="mask file from `memloc localize`: also attack the model pruned with it")
    pruned.add_argument("--pruned-model", help="an already-pruned pipeline folder: also attack it")
    p.add_argument(
        "--prompts",
        help="prompt file: one a line, JSON list, or JSONL with a caption key (default: the captions a model "
        "trained by memloc train memorized)",
    )
    p.add_argument(
        "--training-images",
        help="folder of known training images, for 'actually memorized' (default: a memloc-trained model's photos)",
    )
    p.add_argument("--samples", type=int, default=50, help="generations per prompt (default 50)")
    p.add_argument(
        "--threshold",
        type=float,
        default=PAPER_THRESHOLD,
        help=f"tiled L2 threshold in 8-bit RMS levels (default {PAPER_THRESHOLD:g}, the paper's)",
    )
    p.add_argument("--min-clique", type=int, default=3, help="clique size that identifies a prompt (default 3)")
    p.add_argument("--tile-grid", type=int, default=DEFAULT_GRID, help=f"tiles per side (default {DEFAULT_GRID})")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--batch-size", type=int, default=50, help="samples per UNet batch (default 50)")
    p.add_argument("--limit", type=int, default=None, help="attack only the first N prompts")
    p.add_argument("--out", required=True, help="output folder (replaced when the run succeeds)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.attack import PROMPT_COLUMNS, AttackConfig, attack_pipeline, csv_row
    from ..eval.loading import default_prompts, default_training, load_pipeline
    from ..eval.masks import apply_mask_file, check_mask_for, driver_apply
    from ..eval.report import (
        TABLE1_COLUMNS,
        TABLE1_HEADERS,
        markdown_table,
        table1_rows,
        write_csv,
        write_json,
        write_text,
    )
    from ..eval.sampling import check_tile_grid
    from ..eval.tiled_l2 import threshold_from_tile_l2
    from ..pipeline import resolve_device, resolve_dtype

    try:
        config = AttackConfig(
            samples=args.samples,
            threshold=args.threshold,
            min_clique=args.min_clique,
            grid=args.tile_grid,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except ValueError as exc:
        raise MemlocError(str(exc)) from None
    prompts = default_prompts(args.prompts, args.model)
    if args.limit is not None:
        if args.limit < 1:
            raise MemlocError("--limit must be >= 1")
        prompts = prompts[: args.limit]
    training = default_training(args.training_images, args.model)
    if args.mask:
        driver_apply(args.mask)  # fail now, not after hours of sampling
    if args.pruned_model and not Path(args.pruned_model).is_dir():
        raise MemlocError(f"pruned model folder {args.pruned_model} does not exist")
    check_apart(args.out, model=args.model, mask_file=args.mask, prompt_file=args.prompts,
                pruned_model=args.pruned_model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    check_tile_grid(pipe, args.tile_grid)
    if args.mask:
        check_mask_for(pipe, args.mask)  # another model's mask fails now, not after sampling

    compare = bool(args.mask or args.pruned_model)
    models = [("before pruning", "before")] if compare else [("model", "model")]
    results = {}
    with atomic_dir(args.out) as out:
        label, folder = models[0]
        results[label] = attack_pipeline(
            pipe, prompts, config, label=label, training=training, clique_dir=out / "cliques" / folder
        )
        if compare:
            if args.mask:
                apply_mask_file(pipe, args.mask, backend=args.backend)
            else:
                del pipe
                gc.collect()
                pipe = load_pipeline(args.pruned_model, device=device, dtype=dtype)
            results["after pruning"] = attack_pipeline(
                pipe, prompts, config, label="after pruning", training=training, clique_dir=out / "cliques" / "after"
            )
        table = table1_rows(results, training is not None)
        text = markdown_table(table, TABLE1_COLUMNS, TABLE1_HEADERS)
        notes = (
            f"\nTiled L2 on a {config.grid}x{config.grid} grid, threshold {config.threshold:g} (8-bit RMS levels; "
            f"{config.threshold / 255:.3f} on a 0..1 scale; a 128x128x3 tile's unnormalized 0..1 L2 of 50 would be "
            f"{threshold_from_tile_l2(50):.1f}), clique >= {config.min_clique} of {config.samples} samples, "
            f"{config.steps} steps, guidance {config.guidance:g}.\n"
        )
        write_text(out / "table1.md", text + notes)
        write_csv(out / "table1.csv", table, TABLE1_COLUMNS)
        write_json(
            out / "table1.json",
            {
                "table": table,
                "config": config.as_dict(),
                "model": args.model,
                "mask": args.mask,
                "pruned_model": args.pruned_model,
                "prompts": args.prompts,
                "training_images": args.training_images,
            },
        )
        rows = [csv_row(r) for label_rows in results.values() for r in label_rows]
        write_csv(out / "per_prompt.csv", rows, PROMPT_COLUMNS)
    print(text, end="")
    print(f"wrote {Path(args.out) / 'table1.md'}, per_prompt.csv, cliques/")
    return 0
