"""Generate: images for prompts from the original and the pruned model with the same seeds, as a PNG grid."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .collect import SCHEDULERS, _resolution, _scheduler
from .errors import MemlocError
from .io import atomic_path, check_apart
from .localize import read_mask_file
from .pipeline import denoiser_of, load_pipeline
from .prompts import read_prompts
from .prune import apply_masks
from .stats import check_output

GAP = 4  # pixels between grid cells


def render(pipe, jobs: list[tuple[str, int]], *, steps: int, guidance_scale: float, height: int, width: int,
           batch_size: int = 4, progress: bool = True, desc: str = "generate") -> list:
    """PIL images for (prompt, seed) pairs; each seed drives its own CPU generator as in diffusers."""
    from tqdm.auto import tqdm

    images = []
    bar = tqdm(total=len(jobs), desc=desc, unit="image", disable=not progress or None)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _, seed in batch]
        result = pipe(
            prompt=[prompt for prompt, _ in batch],
            generator=generators,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            output_type="pil",
        )
        images.extend(result.images)
        bar.update(len(batch))
    bar.close()
    return images


def image_grid(columns: list[list]) -> object:
    """Columns of equally sized PIL images side by side, rows aligned, on a white background."""
    from PIL import Image

    w, h = columns[0][0].size
    rows = len(columns[0])
    grid = Image.new("RGB", (len(columns) * w + (len(columns) - 1) * GAP, rows * h + (rows - 1) * GAP), "white")
    for c, column in enumerate(columns):
        for r, image in enumerate(column):
            grid.paste(image.convert("RGB"), (c * (w + GAP), r * (h + GAP)))
    return grid


def generate(
    prompts: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    subset: int | None = None,
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | tuple[int, int] | None = None,
    scheduler: str | None = None,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> Path:
    """Write a PNG grid: one row per (prompt, seed), columns original and (with ``mask``) pruned.

    ``steps`` and ``guidance_scale`` default to 50 and 7.5; the mask (its union over subsets, or
    ``subset``) is applied in place for the pruned column and undone afterwards. Beside the grid,
    ``<out>.json`` names each row's prompt and seed, the columns and the settings.
    """
    prompt_list = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else [str(p) for p in prompts]
    if not prompt_list:
        raise MemlocError("no prompts to generate")
    if not seeds:
        raise MemlocError("--seeds needs at least one seed")
    if batch_size < 1:
        raise MemlocError(f"--batch-size must be >= 1, got {batch_size}")
    if steps is not None and steps < 1:
        raise MemlocError(f"--steps must be >= 1, got {steps}")
    if scheduler is not None and scheduler not in SCHEDULERS and not scheduler.endswith("Scheduler"):
        raise MemlocError(f"--scheduler must be one of {', '.join(SCHEDULERS)} or a diffusers scheduler class")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise MemlocError(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if subset is not None and mask is None:
        raise MemlocError("--subset-index picks a subset of --mask; give --mask too")
    if Path(out).suffix.lower() != ".png":
        raise MemlocError(f"output {out} must be a .png file")
    out = check_output(out)
    legend = check_output(out.with_suffix(".json"))
    for path in (out, legend):
        check_apart(path, prompt_file=prompts if isinstance(prompts, (str, os.PathLike)) else None, mask_file=mask,
                    model=model)
    loaded_mask = read_mask_file(mask) if mask is not None else None
    pipe = load_pipeline(model, device, dtype)
    _scheduler(pipe, scheduler)
    height, width = _resolution(resolution, pipe)
    settings = dict(
        steps=50 if steps is None else steps,
        guidance_scale=7.5 if guidance_scale is None else float(guidance_scale),
        height=height,
        width=width,
        batch_size=batch_size,
        progress=progress,
    )
    pruning = None
    if loaded_mask is not None:  # check the mask against the model before the long part
        pruning = apply_masks(denoiser_of(pipe), loaded_mask, subset, backend, getattr(pipe, "memloc_source", None))
        pruning.undo()
    jobs = [(p, s) for p in prompt_list for s in seeds]
    columns = [render(pipe, jobs, desc="original", **settings)]
    if loaded_mask is not None:
        pruning = apply_masks(denoiser_of(pipe), loaded_mask, subset, backend, getattr(pipe, "memloc_source", None))
        try:
            columns.append(render(pipe, jobs, desc="pruned", **settings))
        finally:
            pruning.undo()
    record = {
        "rows": [{"row": i, "prompt": p, "seed": int(s)} for i, (p, s) in enumerate(jobs)],
        "columns": ["original", "pruned"][: len(columns)],
        "model": str(model) if model is not None else getattr(pipe, "memloc_source", None),
        "mask": str(mask) if mask is not None else None,
        "subset": subset,
        **{k: v for k, v in settings.items() if k != "progress"},
        "scheduler": type(pipe.scheduler).__name__,
    }
    try:
        with atomic_path(legend) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        with atomic_path(out) as tmp:
            image_grid(columns).save(tmp, format="PNG")
    except OSError as exc:
        legend.unlink(missing_ok=True)
        raise MemlocError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
