"""``memloc eval``'s core: methods side by side on memorization, quality and seconds per image.

A *method* is a pipeline plus whether Wen et al.'s inference-time mitigation runs before sampling:
no mitigation, mitigation, and the pruned model. Every method samples the same prompts with the
same seeds; the clock covers mitigation + sampling + decoding (not metrics, not model loading).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .grids import WHITE, save_grid
from .loading import ImageFolder
from .mitigation import WEN_LR, WEN_MAX_ITERS, WEN_SAMPLES, mitigate_embeddings
from .quality import AttributeChecker, ClipScorer, InceptionFeatures, feature_stats, frechet_distance
from .sampling import check_pipeline, encode_prompts, execution, generate, seeds_for
from .sscd import REPLICA_SIMILARITY, SSCD
from .tiled_l2 import DEFAULT_GRID, PAPER_THRESHOLD, tiled_l2

SUMMARY_COLUMNS = (
    "method",
    "prompts",
    "images",
    "seconds_per_image",
    "setup_seconds",
    "detection",
    "tiled_l2_to_training",
    "copy_rate",
    "sscd",
    "sscd_replica_rate",
    "clip_score",
    "clip_score_quality",
    "fid",
    "attribute_accuracy",
    "attribute_accuracy_quality",
    "mitigation_iterations",
)
PROMPT_COLUMNS = (
    "method",
    "prompt_index",
    "prompt",
    "detection",
    "tiled_l2_to_training",
    "copy_rate",
    "sscd",
    "sscd_replica_rate",
    "clip_score",
    "attribute_accuracy",
    "mitigation_iterations",
    "mitigation_first_loss",
    "mitigation_last_loss",
)


@dataclass(frozen=True)
class EvalConfig:
    """Sampling and metric settings shared by all methods (distances in 8-bit RMS levels)."""

    samples: int = 4
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 32
    threshold: float = PAPER_THRESHOLD
    grid: int = DEFAULT_GRID
    quality_samples: int = 1
    mitigation_lr: float = WEN_LR
    mitigation_target_loss: float | None = None  # None: Wen's 3 rescaled to the model's latent size
    mitigation_iters: int = WEN_MAX_ITERS
    mitigation_samples: int = WEN_SAMPLES
    mitigation_batch: int = 16  # samples per UNet forward+backward while optimizing
    save_samples: int = 8

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Metrics:
    """The optional measuring models and data; None where the user supplied none."""

    training: ImageFolder | None = None
    sscd: SSCD | None = None
    clip: ClipScorer | None = None
    inception: InceptionFeatures | None = None
    fid_reference: ImageFolder | None = None
    attributes: AttributeChecker | None = None
    _sscd_train: dict = field(default_factory=dict)
    _fid_reference_stats: tuple | None = None

    def sscd_training(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._sscd_train:
            self._sscd_train[(height, width)] = self.sscd.embed(self.training.at_size(height, width))
        return self._sscd_train[(height, width)]

    def reference_stats(self, height: int, width: int) -> tuple:
        if self._fid_reference_stats is None:
            self._fid_reference_stats = feature_stats(self.inception(self.fid_reference.at_size(height, width)))
        return self._fid_reference_stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(pipe, prompts, config: EvalConfig, samples: int, mitigate: bool, seed_offset: int, bar):
    """Per group of prompts: ``(prompt indices, SampleBatch per prompt, Mitigated or None, seconds taken)``."""
    device, _ = execution(pipe)
    null = encode_prompts(pipe, [""])
    group = max(1, config.batch_size // samples)
    for start in range(0, len(prompts), group):
        indices = list(range(start, min(start + group, len(prompts))))
        seeds = [seeds_for(seed_offset + i, samples, config.seed) for i in indices]
        _sync(device)
        t0 = time.perf_counter()
        cond = encode_prompts(pipe, [prompts[i] for i in indices])
        info = None
        if mitigate:
            info = mitigate_embeddings(
                pipe,
                cond,
                null,
                seeds,
                steps=config.steps,
                lr=config.mitigation_lr,
                target_loss=config.mitigation_target_loss,
                max_iters=config.mitigation_iters,
                opt_samples=config.mitigation_samples,
                batch_size=config.mitigation_batch,
            )
            cond = info.embeds
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
        _sync(device)
        seconds = time.perf_counter() - t0
        yield indices, out, info, seconds


def evaluate_method(
    pipe,
    prompts: Sequence[str],
    config: EvalConfig,
    metrics: Metrics,
    *,
    method: str,
    mitigate: bool,
    quality_prompts: Sequence[str] | None = None,
    sample_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Sample ``prompts`` (and ``quality_prompts``) with one method and measure everything available.

    Returns the summary row (:data:`SUMMARY_COLUMNS`) and one row per prompt (:data:`PROMPT_COLUMNS`).
    """
    check_pipeline(pipe)
    device, _ = execution(pipe)
    total = len(prompts) * config.samples + len(quality_prompts or ()) * config.quality_samples
    rows: list[dict] = []
    seconds = 0.0
    fid_features: list[np.ndarray] = []
    quality_clip: list[float] = []
    quality_attributes: list[float] = []
    size = None
    with tqdm(total=total, desc=f"eval: {method}", unit="img", disable=not progress) as bar:
        for indices, out, info, spent in _run(pipe, prompts, config, config.samples, mitigate, 0, bar):
            seconds += spent
            for k, i in enumerate(indices):
                images = out[k].images
                size = images.shape[1:3]
                row = {
                    "method": method,
                    "prompt_index": i,
                    "prompt": prompts[i],
                    "detection": float(out[k].detection.mean()),
                }
                if metrics.training is not None:
                    to_train = tiled_l2(images, metrics.training.at_size(*size), grid=config.grid, device=device)
                    nearest = to_train.min(dim=1).values
                    row["tiled_l2_to_training"] = float(nearest.mean())
                    row["copy_rate"] = float((nearest < config.threshold).double().mean())
                if metrics.sscd is not None:
                    sim = (metrics.sscd.embed(images) @ metrics.sscd_training(*size).T).max(dim=1).values
                    row["sscd"] = float(sim.mean())
                    row["sscd_replica_rate"] = float((sim > REPLICA_SIMILARITY).double().mean())
                if metrics.clip is not None:
                    row["clip_score"] = float(metrics.clip.score(images, [prompts[i]] * len(images)).mean())
                if metrics.attributes is not None:
                    row["attribute_accuracy"] = metrics.attributes.score(images, prompts[i])
                if info is not None:
                    row["mitigation_iterations"] = info.iterations[k]
                    row["mitigation_first_loss"] = info.first_loss[k]
                    row["mitigation_last_loss"] = info.last_loss[k]
                if metrics.inception is not None and not quality_prompts:
                    fid_features.append(metrics.inception(images))
                if sample_dir is not None and i < config.save_samples:
                    save_grid(Path(sample_dir) / f"{i:04d}.png", [(img, WHITE) for img in images])
                rows.append(row)
        for indices, out, _, spent in _run(
            pipe, list(quality_prompts or ()), config, config.quality_samples, mitigate, len(prompts), bar
        ):
            seconds += spent
            for k, i in enumerate(indices):
                images = out[k].images
                size = images.shape[1:3]
                if metrics.clip is not None:
                    quality_clip += metrics.clip.score(images, [quality_prompts[i]] * len(images)).tolist()
                if metrics.attributes is not None:
                    accuracy = metrics.attributes.score(images, quality_prompts[i])
                    if accuracy is not None:
                        quality_attributes.append(accuracy)
                if metrics.inception is not None:
                    fid_features.append(metrics.inception(images))
    images_made = total
    summary = {
        "method": method,
        "prompts": len(prompts),
        "images": images_made,
        "seconds_per_image": seconds / max(images_made, 1),
        "detection": _mean(rows, "detection"),
        "tiled_l2_to_training": _mean(rows, "tiled_l2_to_training"),
        "copy_rate": _mean(rows, "copy_rate"),
        "sscd": _mean(rows, "sscd"),
        "sscd_replica_rate": _mean(rows, "sscd_replica_rate"),
        "clip_score": _mean(rows, "clip_score"),
        "clip_score_quality": float(np.mean(quality_clip)) if quality_clip else None,
        "attribute_accuracy": _mean(rows, "attribute_accuracy"),
        "attribute_accuracy_quality": float(np.mean(quality_attributes)) if quality_attributes else None,
        "mitigation_iterations": _mean(rows, "mitigation_iterations"),
        "fid": None,
    }
    if metrics.inception is not None and fid_features:
        feats = np.concatenate(fid_features)
        summary["fid"] = frechet_distance(*feature_stats(feats), *metrics.reference_stats(*size))
    return summary, rows


def _mean(rows: Sequence[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None
