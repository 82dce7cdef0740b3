"""Analyze: density and average pairwise IoU of subset masks per (timestep, layer) (the paper's Fig. 1, 2, 6).

For every timestep t <= tau, each subset's mask of eq. 5-6 at t alone; then, per (t, layer), the
mean and spread of the masks' densities over the subsets and the mean IoU over all subset pairs
(pairs of two empty masks are skipped). A last row per layer, timestep ``union``, does the same
for the eq. 7 masks (the union over t <= tau). Outputs: ``analysis.csv``, ``analysis.json``,
``density.png`` and ``iou.png`` (timestep x layer heat maps) and ``union_by_layer.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch

import memloc_kernels as mk

from .io import atomic_dir, check_apart
from .localize import SubsetStatistics, load_checked_denoiser, read_options, resolve_subsets, subset_masks
from .stats import check_output_dir, load_stats

COLUMNS = ("timestep_index", "timestep", "layer_index", "layer", "density_mean", "density_std", "iou_mean", "subsets")


def _summary(masks: mk.PackedMask, backend: str) -> tuple[float, float, float]:
    """Mean and std of the densities of ``masks`` ``[S, d_out, d_in]`` and their mean pairwise IoU."""
    density = mk.mask_density(masks, backend=backend)
    n = density.shape[0]
    std = float(density.std()) if n > 1 else 0.0
    if n < 2:
        return float(density.mean()), std, math.nan
    iou = mk.mask_iou(masks, backend=backend)
    pairs = iou[~torch.eye(n, dtype=torch.bool, device=iou.device)]
    return float(density.mean()), std, float(pairs.nanmean()) if bool(pairs.isfinite().any()) else math.nan


def analyze(
    stats: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sparsity: float,
    timesteps: int | None = None,
    subsets: list[list[int]] | None = None,
    subset_files: list[str | os.PathLike] | None = None,
    n_subsets: int | None = None,
    subset_size: int | None = None,
    seed: int = 0,
    null: str | None = None,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    progress: bool = True,
    denoiser: torch.nn.Module | None = None,
) -> Path:
    """Write density/IoU tables and plots for a collection of subsets into the folder ``out``.

    Options as for :func:`memloc.localize.localize`.
    """
    from tqdm.auto import tqdm

    sparsity, meta, tau, null = read_options(stats, sparsity, timesteps, null)
    out = check_output_dir(out)
    check_apart(out, statistics_file=stats, model=model)
    chosen = resolve_subsets(
        meta["prompts"],
        subsets=subsets,
        subset_files=subset_files,
        n_subsets=n_subsets,
        subset_size=subset_size,
        seed=seed,
    )
    dev, layers, _ = load_checked_denoiser(stats, meta, model, device, dtype, denoiser)
    weights = [layer.weight.detach() for layer in layers]
    subset_stats = SubsetStatistics(load_stats(stats, device=dev), tau, null, dev)
    rows = []
    with torch.no_grad():
        signal, nulls = subset_stats.sums(chosen)
        for t in tqdm(range(tau + 1), desc="analyze", unit="timestep", disable=not progress or None):
            masks = mk.memorized_masks(
                weights, [s[:, t] for s in signal], [n[:, t] for n in nulls], sparsity, backend=backend
            )
            for li, (layer, m) in enumerate(zip(layers, masks)):
                rows.append(_row(t, meta["timesteps"][t], li, layer.name, m, len(chosen), backend))
        union = subset_masks(weights, subset_stats, chosen, sparsity, backend=backend)
        for li, (layer, m) in enumerate(zip(layers, union)):
            rows.append(_row("union", "union", li, layer.name, m, len(chosen), backend))
    json_rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    info = {"sparsity": sparsity, "tau": tau, "null": null, "subsets": chosen, "stats": str(stats), "rows": json_rows}
    with atomic_dir(out) as tmp:
        with open(tmp / "analysis.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "analysis.json").write_text(json.dumps(info, indent=1, allow_nan=False))
        _plot(rows, tau, [layer.name for layer in layers], tmp)
    return out


def _row(t, timestep, li: int, name: str, masks: mk.PackedMask, n: int, backend: str) -> dict:
    density, std, iou = _summary(masks, backend)
    return {
        "timestep_index": t,
        "timestep": timestep,
        "layer_index": li,
        "layer": name,
        "density_mean": density,
        "density_std": std,
        "iou_mean": iou,
        "subsets": n,
    }


def _plot(rows: list[dict], tau: int, names: list[str], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers = len(names)
    per_t = [r for r in rows if r["timestep_index"] != "union"]
    panels = (("density_mean", "mask density", "density.png"), ("iou_mean", "mean pairwise IoU", "iou.png"))
    for key, title, file in panels:
        grid = np.full((tau + 1, n_layers), np.nan)
        for r in per_t:
            grid[r["timestep_index"], r["layer_index"]] = r[key]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * n_layers + 2), max(3, 0.3 * (tau + 1) + 1.5)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 20)))
        ax.set_yticks(range(0, tau + 1, max(1, (tau + 1) // 20)))
        ax.set_xlabel("FFN layer (forward order)")
        ax.set_ylabel("timestep index t")
        ax.set_title(f"{title} per (timestep, layer)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(folder / file, dpi=120)
        plt.close(fig)
    union = sorted((r for r in rows if r["timestep_index"] == "union"), key=lambda r: r["layer_index"])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n_layers + 2), 3.5))
    x = np.arange(n_layers)
    ax.plot(x, [r["density_mean"] for r in union], marker="o", label="density")
    ax.plot(x, [r["iou_mean"] for r in union], marker="s", label="mean pairwise IoU")
    ax.set_xlabel("FFN layer (forward order)")
    ax.set_title(f"eq. 7 masks (union over t <= {tau})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "union_by_layer.png", dpi=120)
    plt.close(fig)
