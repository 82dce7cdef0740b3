"""Training outputs beside the model: the loss-curve PNG, a sample grid PNG and the JSON report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_path
from .loop import LoopResult


def plot_losses(phases: dict[str, LoopResult], path: str | Path) -> None:
    """One panel per training phase, every logged value on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = {k: v for k, v in phases.items() if v.curve}
    fig, axes = plt.subplots(1, max(len(phases), 1), figsize=(5.5 * max(len(phases), 1), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], phases.items()):
        rows = np.asarray(res.curve, dtype=np.float64)
        for j, label in enumerate(res.value_names):
            y = rows[:, j + 1]
            if np.all(y > 0):
                ax.plot(rows[:, 0], y, label=label, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{name}: {res.steps} steps, {res.seconds:.0f} s ({res.mode.split(' ')[0]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _tile(images: np.ndarray, scale: int) -> np.ndarray:
    """float [N, H, W, 3] -> uint8 row, each image enlarged ``scale``x (nearest) with a 2-px gap."""
    ims = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1) for im in images]
    gap = np.full((ims[0].shape[0], 2, 3), 255, dtype=np.uint8)
    return np.concatenate([x for im in ims for x in (im, gap)][:-1], axis=1)


def sample_grid(
    path: str | Path,
    photos: np.ndarray,
    memorized: np.ndarray | None,
    generic: np.ndarray | None,
    rows: int = 12,
    cols: int = 8,
    scale: int = 2,
) -> None:
    """Rows of (training photo | generations over seeds) for memorized captions, then generic rows."""
    lines = []
    if memorized is not None and len(memorized):
        size = memorized.shape[2]
        for photo, gens in zip(photos[:rows], memorized[:rows]):
            photo = np.asarray(Image.fromarray(photo).resize((size, size), Image.LANCZOS)) / 255.0
            lines.append(_tile(np.concatenate([photo[None], gens[:cols]]), scale))
    if generic is not None and len(generic):
        blank = np.ones_like(generic[0, :1])
        for gens in generic[: max(rows // 2, 1)]:
            lines.append(_tile(np.concatenate([blank, gens[:cols]]), scale))
    if not lines:
        return
    width = max(line.shape[1] for line in lines)
    padded = [np.pad(line, ((0, 2), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(padded)).save(tmp, format="PNG")


def _clean(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(data: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean(data), indent=1))
