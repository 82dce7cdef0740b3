"""What a trained model memorized: captions, their training photos and the generic evaluation captions."""

# Stored beside the pipeline's components (``from_pretrained`` ignores these files), so that
# ``memloc demo`` and the tests can measure memorization without scikit-image or the training code:
# ``memorization.json`` (captions, sources, evaluation set, recipe) and ``memorized_photos.png``
# (the training photos side by side, lossless).

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MemlocError

MANIFEST_NAME = "memorization.json"
PHOTOS_NAME = "memorized_photos.png"
FORMAT = 1


@dataclass
class Manifest:
    """``memorized[i]`` (a dict with ``caption`` and where the photo came from) goes with ``photos[i]``."""

    image_size: int
    near_copy_rmse: float
    memorized: list[dict]
    photos: np.ndarray  # uint8 [P, S, S, 3]
    generic_eval: list[dict] = field(default_factory=list)  # {"caption", "attributes"}
    training: dict = field(default_factory=dict)

    @property
    def captions(self) -> list[str]:
        return [m["caption"] for m in self.memorized]


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    folder = Path(folder)
    if len(manifest.memorized) != len(manifest.photos):
        raise ValueError(f"{len(manifest.memorized)} memorized captions but {len(manifest.photos)} photos")
    if len(manifest.photos):
        strip = np.concatenate(list(manifest.photos), axis=1)
        Image.fromarray(strip).save(folder / PHOTOS_NAME)
    record = {
        "format": FORMAT,
        "image_size": manifest.image_size,
        "near_copy_rmse": manifest.near_copy_rmse,
        "photos_file": PHOTOS_NAME,
        "memorized": manifest.memorized,
        "generic_eval": manifest.generic_eval,
        "training": manifest.training,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(record, indent=1))


def read_manifest(folder: str | Path) -> Manifest:
    """Read a model folder's manifest; a MemlocError says what is missing."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise MemlocError(f"{folder} has no {MANIFEST_NAME}: it was not trained by memloc train")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise MemlocError(f"{path} has format {record.get('format')!r}, expected {FORMAT}")
    size = int(record["image_size"])
    memorized = record["memorized"]
    photos = np.zeros((0, size, size, 3), dtype=np.uint8)
    if memorized:
        strip = np.asarray(Image.open(folder / record["photos_file"]).convert("RGB"))
        if strip.shape != (size, size * len(memorized), 3):
            raise MemlocError(f"{record['photos_file']} has shape {strip.shape}, expected {len(memorized)} photos")
        photos = strip.reshape(size, len(memorized), size, 3).transpose(1, 0, 2, 3).copy()
    return Manifest(
        image_size=size,
        near_copy_rmse=float(record["near_copy_rmse"]),
        memorized=memorized,
        photos=photos,
        generic_eval=record.get("generic_eval", []),
        training=record.get("training", {}),
    )
