"""``memloc eval``: no mitigation vs Wen et al.'s inference-time mitigation vs pruning (Figures 3-4)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import time
from pathlib import Path

from ..cli import add_common_args
from ..errors import MemlocError
from ..io import atomic_dir, check_apart

METHODS = ("none", "mitigation", "pruned")
DESCRIPTION = """\
Compare three ways to generate from memorized prompts: the model as it is ("none"), the model with
Wen et al.'s inference-time mitigation ("mitigation": the prompt embedding is optimized before
sampling, AdamW lr 0.05, at most 10 steps, until the first-step detection loss is <= 3), and the
pruned model ("pruned": --mask or --pruned-model). All use the same seeds. Measured per method:
Wen et al.'s detection metric, tiled L2 distance and copy rate to --training-images, SSCD similarity
(--sscd), CLIP score (--clip-model), FID (--fid-reference with --inception), attribute accuracy
(--attribute-accuracy, embedded model) and seconds per image. Writes summary.{md,csv,json},
per_prompt.csv, fig3_*_vs_memorization.png, fig4_seconds_per_image.png and samples/.
"""


def add_parser(subparsers) -> None:
    from ..eval.mitigation import WEN_LR, WEN_MAX_ITERS, WEN_SAMPLES
    from ..eval.tiled_l2 import DEFAULT_GRID, PAPER_THRESHOLD

    p = subparsers.add_parser(
        "eval",
        help="memorization, quality and speed: no mitigation vs inference-time mitigation vs pruning",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    pruned = p.add_mutually_exclusive_group()
    pruned.add_argument("--mask", help="mask file from `memloc localize` (the pruned method prunes --model with it)")
    pruned.add_argument("--pruned-model", help="an already-pruned pipeline folder (the pruned method)")
    p.add_argument(
        "--prompts",
        help="memorized prompts: one a line, JSON list, or JSONL with a caption key (default: the captions a model "
        "trained by memloc train memorized)",
    )
    p.add_argument("--quality-prompts", help="generic prompts (e.g. COCO captions) for CLIP score and FID")
    p.add_argument(
        "--training-images",
        help="folder of the training images the prompts reproduce (default: a memloc-trained model's photos)",
    )
    p.add_argument("--sscd", help="SSCD model file (TorchScript, or ONNX with onnxruntime) for SSCD similarity")
    p.add_argument("--clip-model", help="local transformers CLIP folder for the CLIP score")
    p.add_argument("--fid-reference", help="folder of reference images for FID (needs --inception)")
    p.add_argument(
        "--inception", help="Inception weights for FID: TorchScript FID Inception or torchvision inception_v3"
    )
    p.add_argument(
        "--attribute-accuracy",
        action="store_true",
        help="procedural attribute accuracy on the generic captions of a memloc-trained model (embedded model)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of none,mitigation,pruned")
    p.add_argument("--samples", type=int, default=4, help="generations per memorized prompt (default 4)")
    p.add_argument("--quality-samples", type=int, default=1, help="generations per quality prompt (default 1)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per UNet batch (default 32)")
    p.add_argument(
        "--threshold",
        type=float,
        default=PAPER_THRESHOLD,
        help=f"tiled L2 copy threshold in 8-bit RMS levels (default {PAPER_THRESHOLD:g})",
    )
    p.add_argument("--tile-grid", type=int, default=DEFAULT_GRID, help=f"tiles per side (default {DEFAULT_GRID})")
    p.add_argument("--mitigation-lr", type=float, default=WEN_LR, help=f"AdamW learning rate (default {WEN_LR:g})")
    p.add_argument(
        "--mitigation-target-loss",
        type=float,
        default=None,
        help="stop once the mean per-sample first-step loss is <= this (default: Wen et al.'s 3 for SD's 4x64x64 "
        "latent, rescaled to the model's latent size at equal per-value RMS)",
    )
    p.add_argument(
        "--mitigation-iters", type=int, default=WEN_MAX_ITERS, help=f"max AdamW steps (default {WEN_MAX_ITERS})"
    )
    p.add_argument(
        "--mitigation-samples",
        type=int,
        default=WEN_SAMPLES,
        help=f"seeds whose first-step noise is optimized on (default {WEN_SAMPLES})",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N memorized prompts")
    p.add_argument("--save-samples", type=int, default=8, help="save sample grids of the first N prompts (default 8)")
    p.add_argument("--out", required=True, help="output folder (replaced when the run succeeds)")
    p.set_defaults(func=run)


def _methods(text: str, pruned: bool) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MemlocError(f"--methods takes a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    if "pruned" in methods and not pruned:
        if text != ",".join(METHODS):
            raise MemlocError("--methods pruned needs --mask or --pruned-model")
        methods.remove("pruned")  # the default list: compare what is available
    # canonical order: --mask prunes the loaded model in place, so "pruned" must come last
    return sorted(set(methods), key=METHODS.index)


def run(args) -> int:
    from ..eval.compare import PROMPT_COLUMNS, SUMMARY_COLUMNS, EvalConfig, Metrics, evaluate_method
    from ..eval.loading import (
        ImageFolder,
        default_prompts,
        default_training,
        load_pipeline,
        read_prompts,
    )
    from ..eval.masks import apply_mask_file, check_mask_for, driver_apply
    from ..eval.mitigation import default_target_loss
    from ..eval.quality import AttributeChecker, ClipScorer, InceptionFeatures
    from ..eval.report import markdown_table, write_csv, write_json, write_text
    from ..eval.sampling import check_tile_grid
    from ..eval.sscd import SSCD
    from ..pipeline import resolve_device, resolve_dtype

    methods = _methods(args.methods, bool(args.mask or args.pruned_model))
    for name in ("samples", "quality_samples", "steps", "batch_size", "tile_grid", "mitigation_samples"):
        if getattr(args, name) < 1:
            raise MemlocError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("mitigation_iters", "save_samples"):
        if getattr(args, name) < 0:
            raise MemlocError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("mitigation_lr", "threshold"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            raise MemlocError(f"--{name.replace('_', '-')} must be a number > 0, got {getattr(args, name)}")
    if not math.isfinite(args.guidance):
        raise MemlocError(f"--guidance must be a finite number, got {args.guidance}")
    config = EvalConfig(
        samples=args.samples,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        threshold=args.threshold,
        grid=args.tile_grid,
        quality_samples=args.quality_samples,
        mitigation_lr=args.mitigation_lr,
        mitigation_target_loss=args.mitigation_target_loss,
        mitigation_iters=args.mitigation_iters,
        mitigation_samples=args.mitigation_samples,
        save_samples=args.save_samples,
    )
    prompts = default_prompts(args.prompts, args.model)
    if args.limit is not None:
        if args.limit < 1:
            raise MemlocError("--limit must be >= 1")
        prompts = prompts[: args.limit]
    quality_prompts = read_prompts(args.quality_prompts) if args.quality_prompts else None
    check_apart(args.out, model=args.model, mask_file=args.mask, prompt_file=args.prompts,
                pruned_model=args.pruned_model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    # every optional model is loaded before sampling, so a missing one fails in seconds
    metrics = Metrics(training=default_training(args.training_images, args.model))
    if args.sscd:
        if metrics.training is None:
            raise MemlocError("--sscd measures similarity to training images; pass --training-images DIR too")
        metrics.sscd = SSCD(args.sscd, device)
    if args.clip_model:
        metrics.clip = ClipScorer(args.clip_model, device)
    if args.fid_reference or args.inception:
        if not args.fid_reference:
            raise MemlocError("--inception is for FID; pass the reference image folder with --fid-reference DIR")
        metrics.fid_reference = ImageFolder(args.fid_reference, "FID reference folder")
        metrics.inception = InceptionFeatures(args.inception, device)
    if args.attribute_accuracy:
        metrics.attributes = AttributeChecker(args.model)
        if quality_prompts is None:
            quality_prompts = metrics.attributes.captions
    if "pruned" in methods and args.mask:
        driver_apply(args.mask)
    if args.pruned_model and not Path(args.pruned_model).is_dir():
        raise MemlocError(f"pruned model folder {args.pruned_model} does not exist")

    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    check_tile_grid(pipe, args.tile_grid)
    if "pruned" in methods and args.mask:
        check_mask_for(pipe, args.mask)  # another model's mask fails now, not after sampling
    if config.mitigation_target_loss is None:
        config = dataclasses.replace(config, mitigation_target_loss=default_target_loss(pipe))
    summaries, rows = [], []
    with atomic_dir(args.out) as out:
        for method in methods:
            setup = 0.0
            if method == "pruned":
                if args.mask:
                    t0 = time.perf_counter()
                    apply_mask_file(pipe, args.mask, backend=args.backend)
                    setup = time.perf_counter() - t0
                else:
                    del pipe
                    gc.collect()
                    pipe = load_pipeline(args.pruned_model, device=device, dtype=dtype)
            summary, prompt_rows = evaluate_method(
                pipe,
                prompts,
                config,
                metrics,
                method=method,
                mitigate=method == "mitigation",
                quality_prompts=quality_prompts,
                sample_dir=out / "samples" / method,
            )
            summary["setup_seconds"] = setup
            summaries.append(summary)
            rows += prompt_rows
        columns = [
            c
            for c in SUMMARY_COLUMNS
            if c in ("method", "prompts", "images", "seconds_per_image") or any(s.get(c) is not None for s in summaries)
        ]
        text = markdown_table(summaries, columns)
        write_text(out / "summary.md", text + _notes(config))
        write_csv(out / "summary.csv", summaries, SUMMARY_COLUMNS)
        write_json(
            out / "summary.json",
            {
                "summary": summaries,
                "config": config.as_dict(),
                "model": args.model,
                "mask": args.mask,
                "pruned_model": args.pruned_model,
                "prompts": args.prompts,
            },
        )
        write_csv(out / "per_prompt.csv", rows, PROMPT_COLUMNS)
        _figures(out, summaries)
    print(text, end="")
    print(f"wrote {Path(args.out) / 'summary.md'}, per_prompt.csv, figures")
    return 0


MEMORIZATION_AXES = (
    ("sscd", "SSCD similarity to training image"),
    ("copy_rate", "copy rate (tiled L2 < threshold)"),
    ("detection", "detection metric (Wen et al.)"),
)
QUALITY_AXES = (
    ("clip_score", "CLIP score"),
    ("clip_score_quality", "CLIP score (quality prompts)"),
    ("fid", "FID"),
    ("attribute_accuracy_quality", "attribute accuracy (generic captions)"),
)


def _figures(out: Path, summaries: list[dict]) -> None:
    from ..eval.plots import quality_vs_memorization, seconds_bars

    x = next(((k, name) for k, name in MEMORIZATION_AXES if all(s.get(k) is not None for s in summaries)), None)
    for key, name in QUALITY_AXES:
        if x is not None and all(s.get(key) is not None for s in summaries):
            quality_vs_memorization(
                out / f"fig3_{key}_vs_memorization.png",
                summaries,
                x=x[0],
                y=key,
                xlabel=x[1],
                ylabel=name,
                title=f"{name} vs memorization",
            )
    seconds_bars(out / "fig4_seconds_per_image.png", summaries, title="wall-clock per image")


def _notes(config) -> str:
    return (
        f"\n{config.samples} samples per prompt, {config.steps} steps, guidance {config.guidance:g}, seeds from "
        f"{config.seed}. Tiled L2 on a {config.grid}x{config.grid} grid in 8-bit RMS levels "
        f"(copy: < {config.threshold:g}). "
        f"Mitigation: AdamW lr {config.mitigation_lr:g}, <= {config.mitigation_iters} steps, target "
        f"{config.mitigation_target_loss:g} (mean per-sample norm over {config.mitigation_samples} seeds). "
        "seconds_per_image covers mitigation + sampling + decoding; setup_seconds the one-time pruning.\n"
    )
