"""Measure memorization: near copies of training photos across seeds, and attributes/diversity of generic captions."""

# Distance is pixel RMSE on a 0-1 scale after resizing generations to the manifest's image size
# (32 for the embedded model); a generation is a near copy of a photo when the distance is below
# ``NEAR_COPY_RMSE`` = 0.1. The embedded model's 32 photos differ from each other by at least 0.16,
# so a near copy is unambiguous. Every generation gets its own CPU generator seeded with its seed,
# so a (caption, seed) pair gives the same image whatever the batch and on any device.

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .attributes import ATTRIBUTES, attribute_hits, detect
from .manifest import Manifest

NEAR_COPY_RMSE = 0.1
DEFAULT_SEEDS = tuple(range(10))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """float [N, H, W, 3] in [0, 1] -> float [N, size, size, 3] (area/antialiased resize when shrinking)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images.astype(np.float32)
    out = [
        np.asarray(Image.fromarray((im * 255).round().astype(np.uint8)).resize((size, size), Image.LANCZOS))
        for im in images
    ]
    return np.stack(out).astype(np.float32) / 255.0


def rmse(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pixel RMSE of each of ``images`` [N, H, W, 3] to ``reference`` [H, W, 3] (both 0-1 floats)."""
    diff = images.astype(np.float32) - reference.astype(np.float32)[None]
    return np.sqrt((diff**2).reshape(len(images), -1).mean(axis=1))


def as_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)


@torch.no_grad()
def generate(
    pipe,
    captions: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 30,
    guidance: float = 5.0,
    batch_size: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Images for every (caption, seed): float ``[len(captions), len(seeds), H, W, 3]`` in [0, 1]."""
    pairs = [(c, s) for c in captions for s in seeds]
    chunks = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="generate", disable=not progress, leave=False):
        part = pairs[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for _, s in part]
        out = pipe(
            prompt=[c for c, _ in part],
            generator=generators,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
        )
        chunks.append(np.asarray(out.images, dtype=np.float32))
    images = np.concatenate(chunks)
    return images.reshape(len(captions), len(seeds), *images.shape[1:])


def memorized_stats(
    generations: np.ndarray,
    photos: np.ndarray,
    threshold: float = NEAR_COPY_RMSE,
    gallery: np.ndarray | None = None,
    own_index: Sequence[int] | None = None,
) -> dict:
    """Near-copy statistics of ``generations`` [C, S, H, W, 3] against each caption's photo ``photos`` [C, ...].

    ``nearest_is_own`` is how often the closest photo of ``gallery`` (default ``photos``) is the
    caption's own, ``gallery[own_index[c]]`` (default ``c``).
    """
    size = photos.shape[1]
    photos = as_float(photos)
    gallery = photos if gallery is None else as_float(gallery)
    own_index = list(range(len(photos))) if own_index is None else list(own_index)
    per_caption = []
    for gens, photo, own in zip(generations, photos, own_index):
        gens = resize_images(gens, size)
        d = rmse(gens, photo)
        to_all = np.stack([rmse(gens, g) for g in gallery], axis=1)
        per_caption.append(
            {
                "near_copy_rate": float((d < threshold).mean()),
                "mean_rmse": float(d.mean()),
                "min_rmse": float(d.min()),
                "nearest_is_own": float((to_all.argmin(axis=1) == own).mean()),
            }
        )
    rates = np.array([p["near_copy_rate"] for p in per_caption])
    return {
        "threshold_rmse": threshold,
        "captions": len(per_caption),
        "seeds": int(generations.shape[1]),
        "near_copy_rate": float(rates.mean()) if len(rates) else float("nan"),
        "captions_majority_copied": float((rates > 0.5).mean()) if len(rates) else float("nan"),
        "mean_rmse": float(np.mean([p["mean_rmse"] for p in per_caption])) if per_caption else float("nan"),
        "nearest_is_own": float(np.mean([p["nearest_is_own"] for p in per_caption])) if per_caption else float("nan"),
        "per_caption": per_caption,
    }


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMSE between the images [S, H, W, 3] of one caption (0 when all are equal)."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    d = [np.sqrt(((flat[i] - flat[j]) ** 2).mean()) for i in range(len(flat)) for j in range(i + 1, len(flat))]
    return float(np.mean(d)) if d else 0.0


def generic_stats(
    generations: np.ndarray, attributes: Sequence[dict], photos: np.ndarray | None = None, image_size: int = 32
) -> dict:
    """Attribute accuracy and diversity of ``generations`` [C, S, H, W, 3] for generic captions.

    With ``photos``, also the rate of generations that are near copies of any memorized photo
    (should be 0: generic captions must not leak memorized content).
    """
    hits = {k: [] for k in (*ATTRIBUTES, "all")}
    per_caption = []
    leak = []
    for gens, attrs in zip(generations, attributes):
        gens = resize_images(gens, image_size)
        caption_hits = [attribute_hits(detect(g), attrs) for g in gens]
        for h in caption_hits:
            for k, v in h.items():
                hits[k].append(v)
        per_caption.append(
            {
                "all": float(np.mean([h["all"] for h in caption_hits])),
                "diversity_rmse": diversity(gens),
            }
        )
        if photos is not None and len(photos):
            d = np.stack([rmse(gens, p) for p in as_float(photos)], axis=1)
            leak.append(float((d.min(axis=1) < NEAR_COPY_RMSE).mean()))
    accuracy = {k: float(np.mean(v)) for k, v in hits.items() if v}
    return {
        "captions": len(per_caption),
        "seeds": int(generations.shape[1]),
        "attribute_accuracy": accuracy,
        "diversity_rmse": float(np.mean([p["diversity_rmse"] for p in per_caption])) if per_caption else float("nan"),
        "photo_copy_rate": float(np.mean(leak)) if leak else None,
        "per_caption": per_caption,
    }


def measure(
    pipe,
    manifest: Manifest,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    steps: int = 30,
    guidance: float = 5.0,
    batch_size: int = 128,
    memorized: Sequence[int] | None = None,
    progress: bool = True,
) -> dict:
    """Memorized near-copy rates and generic attribute accuracy/diversity of ``pipe``.

    ``memorized`` picks which memorized captions to test (indices into the manifest; default all),
    e.g. the held-out half in ``memloc demo``. Returns the numbers and, under ``images``, the
    generations (not JSON-serializable; pop it before writing).
    """
    idx = list(range(len(manifest.memorized))) if memorized is None else list(memorized)
    captions = [manifest.memorized[i]["caption"] for i in idx]
    photos = manifest.photos[idx]
    kw = dict(steps=steps, guidance=guidance, batch_size=batch_size, progress=progress)
    result = {"seeds": list(seeds), "steps": steps, "guidance": guidance, "memorized_indices": idx}
    images = {}
    if captions:
        gens = generate(pipe, captions, seeds, **kw)
        result["memorized"] = memorized_stats(gens, photos, manifest.near_copy_rmse, manifest.photos, idx)
        for entry, caption, i in zip(result["memorized"]["per_caption"], captions, idx):
            entry.update(caption=caption, index=i)
        images["memorized"] = gens
    if manifest.generic_eval:
        gcaps = [g["caption"] for g in manifest.generic_eval]
        gens = generate(pipe, gcaps, seeds, **kw)
        result["generic"] = generic_stats(
            gens, [g["attributes"] for g in manifest.generic_eval], manifest.photos, manifest.image_size
        )
        for entry, caption in zip(result["generic"]["per_caption"], gcaps):
            entry["caption"] = caption
        images["generic"] = gens
    result["images"] = images
    return result
