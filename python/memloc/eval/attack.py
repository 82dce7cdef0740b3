"""Carlini et al.'s extraction attack, as the memorization-localization paper runs it (Section 5.4).

Per prompt: ``samples`` generations with different seeds; the tiled L2 distance
(:mod:`memloc.eval.tiled_l2`) between every pair; a graph with an edge where the distance is under
the threshold; the prompt is *identified as memorized* when the graph has a clique of at least
``min_clique`` samples (exact maximum clique, :mod:`memloc.eval.cliques`). With known training
images, it is *actually memorized* when the medoid of that clique (least summed distance to the
other members) is within the threshold of one of them. Before/after pruning uses the same seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cliques import clique_medoid, max_clique
from .grids import WHITE, save_grid
from .loading import ImageFolder
from .sampling import check_pipeline, encode_prompts, execution, generate, seeds_for
from .tiled_l2 import DEFAULT_GRID, PAPER_THRESHOLD, tiled_l2

PROMPT_COLUMNS = (
    "model",
    "prompt_index",
    "prompt",
    "samples",
    "max_clique",
    "identified",
    "clique",
    "medoid",
    "medoid_seed",
    "nearest_training",
    "training_distance",
    "actually_memorized",
    "min_pair_distance",
    "median_pair_distance",
    "detection",
)
MEDOID_FRAME = (220, 30, 30)
TRAINING_FRAME = (30, 180, 30)


@dataclass(frozen=True)
class AttackConfig:
    """Settings of the attack; distances in 8-bit RMS levels (see :mod:`memloc.eval.tiled_l2`)."""

    samples: int = 50
    threshold: float = PAPER_THRESHOLD
    min_clique: int = 3
    grid: int = DEFAULT_GRID
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 50

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (pairs are compared), got {self.samples}")
        if self.min_clique < 2:
            raise ValueError(f"min_clique must be >= 2, got {self.min_clique}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        for name in ("steps", "batch_size", "grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be a finite number, got {self.guidance}")

    def as_dict(self) -> dict:
        return asdict(self)


def analyze_prompt(
    images: np.ndarray,
    *,
    threshold: float = PAPER_THRESHOLD,
    min_clique: int = 3,
    grid: int = DEFAULT_GRID,
    training: ImageFolder | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """The attack's verdict on one prompt's generations ``[K, H, W, 3]`` (uint8).

    Returns a dict with ``max_clique`` (size), ``identified``, ``clique`` (sample indices),
    ``medoid``, and with ``training``: ``nearest_training`` (file), ``training_distance`` and
    ``actually_memorized`` (else None), plus the min and median pairwise distance.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be [K >= 2, H, W, C], got {images.shape}")
    dist = tiled_l2(images, grid=grid, device=device)
    adjacency = (dist < threshold).numpy()
    np.fill_diagonal(adjacency, False)
    clique = max_clique(adjacency)
    identified = len(clique) >= min_clique
    pairs = dist[~torch.eye(len(images), dtype=torch.bool)]
    row = {
        "samples": len(images),
        "max_clique": len(clique),
        "identified": identified,
        "clique": clique if identified else [],
        "medoid": None,
        "nearest_training": None,
        "training_distance": None,
        "actually_memorized": None if training is None else False,
        "min_pair_distance": float(pairs.min()),
        "median_pair_distance": float(pairs.median()),
    }
    if identified:
        medoid = clique_medoid(dist, clique)
        row["medoid"] = medoid
        if training is not None:
            train = training.at_size(images.shape[1], images.shape[2])
            to_train = tiled_l2(images[medoid], train, grid=grid, device=device)[0]
            nearest = int(torch.argmin(to_train))
            row["nearest_training"] = training.names[nearest]
            row["training_distance"] = float(to_train[nearest])
            row["actually_memorized"] = bool(to_train[nearest] < threshold)
    return row


def attack_pipeline(
    pipe,
    prompts: Sequence[str],
    config: AttackConfig,
    *,
    label: str = "model",
    training: ImageFolder | None = None,
    clique_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate ``config.samples`` images per prompt and run :func:`analyze_prompt` on each prompt.

    Prompts are batched together (``config.batch_size`` samples per UNet batch); a prompt's images
    are dropped once analyzed. With ``clique_dir``, each identified clique is saved as
    ``clique_dir/<prompt_index>.png``. Returns one row (dict, :data:`PROMPT_COLUMNS`) per prompt.
    """
    check_pipeline(pipe)
    device, _ = execution(pipe)
    null = encode_prompts(pipe, [""])
    group = max(1, config.batch_size // config.samples)
    rows = []
    with tqdm(total=len(prompts) * config.samples, desc=f"attack: {label}", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), group):
            indices = list(range(start, min(start + group, len(prompts))))
            cond = encode_prompts(pipe, [prompts[i] for i in indices])
            seeds = [seeds_for(i, config.samples, config.seed) for i in indices]
            out = generate(
                pipe,
                cond,
                null,
                seeds,
                steps=config.steps,
                guidance=config.guidance,
                batch_size=config.batch_size,
                progress=bar,
            )
            for i, prompt_seeds, batch in zip(indices, seeds, out):
                verdict = analyze_prompt(
                    batch.images,
                    threshold=config.threshold,
                    min_clique=config.min_clique,
                    grid=config.grid,
                    training=training,
                    device=device,
                )
                row = {"model": label, "prompt_index": i, "prompt": prompts[i], **verdict}
                row["medoid_seed"] = None if verdict["medoid"] is None else prompt_seeds[verdict["medoid"]]
                row["detection"] = float(batch.detection.mean())
                if verdict["identified"] and clique_dir is not None:
                    match = None
                    if verdict["nearest_training"] is not None:
                        names = training.names
                        match = training.at_size(*batch.images.shape[1:3])[names.index(verdict["nearest_training"])]
                    save_clique_png(
                        Path(clique_dir) / f"{i:04d}.png", batch.images, verdict["clique"], verdict["medoid"], match
                    )
                rows.append(row)
    return rows


def csv_row(row: dict) -> dict:
    """A per-prompt row with the clique as ``1;4;7`` for CSV."""
    out = dict(row)
    out["clique"] = ";".join(str(i) for i in row["clique"])
    return out


def save_clique_png(
    path: Path,
    images: np.ndarray,
    clique: Sequence[int],
    medoid: int,
    training_image: np.ndarray | None = None,
) -> None:
    """The clique's samples in a grid, medoid first (red frame), then the matched training image (green frame)."""
    order = [medoid] + [i for i in clique if i != medoid]
    tiles = [(images[i], MEDOID_FRAME if i == medoid else WHITE) for i in order]
    if training_image is not None:
        tiles.append((training_image, TRAINING_FRAME))
    save_grid(path, tiles)
