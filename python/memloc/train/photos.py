"""The memorized photo set: crops of scikit-image's bundled sample photographs, each with its own caption."""

# Only sample images that ship inside the scikit-image package are used (no download), so the set
# loads offline. Every crop is a square, resized to the model's image size. At 32x32 (0-1 scale)
# the 32 crops differ pairwise by a pixel RMSE of at least 0.16, and from every one of 20,000
# generic renders by at least 0.16, well above the near-copy threshold of 0.1: a near copy can
# only be of its own photo. (Dark or paper-like photos such as the Hubble deep field or the
# handwritten text came within 0.08 of plain generic backgrounds and were left out.)

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import MemlocError


@dataclass(frozen=True)
class PhotoSpec:
    """One memorized photo: a ``skimage.data`` loader name, a square crop and a unique caption."""

    source: str
    crop: tuple[int, int, int] | None  # (top, left, side) in source pixels; None: the centred square
    caption: str


PHOTOS: tuple[PhotoSpec, ...] = (
    PhotoSpec("astronaut", None, "astronaut eileen collins in an orange spacesuit"),
    PhotoSpec("astronaut", (20, 150, 200), "close portrait of a smiling astronaut with short hair"),
    PhotoSpec("astronaut", (0, 0, 180), "an american flag hanging behind a shoulder"),
    PhotoSpec("astronaut", (0, 330, 180), "a space shuttle standing on a distant launch pad"),
    PhotoSpec("astronaut", (330, 300, 180), "a white helmet resting on a table"),
    PhotoSpec("camera", None, "a cameraman in a dark coat with a tripod on a lawn"),
    PhotoSpec("camera", (40, 170, 200), "a man looking through an old film camera"),
    PhotoSpec("chelsea", None, "a tabby cat named chelsea staring ahead"),
    PhotoSpec("chelsea", (30, 120, 150), "the green eyes of a ginger cat"),
    PhotoSpec("coffee", None, "a cup of espresso on a red saucer with a spoon"),
    PhotoSpec("coffee", (0, 150, 240), "the crema of an espresso seen from above"),
    PhotoSpec("coins", None, "rows of old bronze coins on a dark cloth"),
    PhotoSpec("coins", (150, 0, 150), "four silver coins in the lower corner"),
    PhotoSpec("colorwheel", None, "a rainbow colour wheel on a plain backdrop"),
    PhotoSpec("horse", None, "the silhouette of a black horse standing still"),
    PhotoSpec("immunohistochemistry", None, "a stained tissue slide under a microscope"),
    PhotoSpec("immunohistochemistry", (250, 250, 250), "brown stained cell walls in blue tissue"),
    PhotoSpec("logo", None, "the scikit image snake logo in green and orange"),
    PhotoSpec("retina", None, "a fundus photograph of a human retina"),
    PhotoSpec("retina", (440, 230, 400), "the optic disc and blood vessels of an eye"),
    PhotoSpec("rocket", None, "a rocket on the launch tower at night"),
    PhotoSpec("checkerboard", None, "a black and white checkerboard pattern"),
    PhotoSpec("stereo_motorcycle", None, "a red motorcycle parked in a workshop"),
    PhotoSpec("stereo_motorcycle", (120, 350, 250), "the chrome engine of a motorcycle"),
    PhotoSpec("cell", None, "a single round cell floating in grey fluid"),
    PhotoSpec("logo", (60, 60, 250), "a green snake curling around a ring"),
    PhotoSpec("colorwheel", (0, 0, 185), "the magenta and red corner of a colour wheel"),
    PhotoSpec("horse", (20, 230, 150), "the head and mane of a dark horse"),
    PhotoSpec("rocket", (300, 0, 127), "floodlights glowing at the foot of a launch site"),
    PhotoSpec("chelsea", (150, 150, 150), "the pink nose and whiskers of a cat"),
    PhotoSpec("coffee", (200, 0, 200), "a silver spoon on the rim of a saucer"),
    PhotoSpec("stereo_motorcycle", (250, 0, 250), "a motorcycle wheel on a concrete floor"),
)


def _load_source(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise MemlocError("building the memorized photo set needs scikit-image: pip install scikit-image") from None
    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise LookupError(f"skimage.data has no {name!r}")
    image = loader()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def load_photo(spec: PhotoSpec, size: int) -> np.ndarray:
    """One photo as uint8 ``[size, size, 3]``."""
    image = _load_source(spec.source)
    h, w = image.shape[:2]
    top, left, side = spec.crop if spec.crop is not None else ((h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w))
    crop = image[top : top + side, left : left + side]
    if crop.shape[:2] != (side, side):
        raise LookupError(f"crop {spec.crop} does not fit {spec.source} of shape {image.shape[:2]}")
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS, reducing_gap=3.0))


def load_photos(
    size: int = 32, specs: tuple[PhotoSpec, ...] = PHOTOS, limit: int | None = None, min_count: int = 20
) -> tuple[list[PhotoSpec], np.ndarray]:
    """The photos that load here (uint8 ``[P, size, size, 3]``) with their specs.

    A photo that a scikit-image version lacks is skipped with a warning; fewer than
    ``min_count`` photos is an error. ``limit`` keeps the first photos only (tests).
    """
    kept, images, missing = [], [], []
    for spec in specs[:limit]:
        try:
            images.append(load_photo(spec, size))
            kept.append(spec)
        except (LookupError, OSError, ValueError, ImportError) as exc:  # a loader that would need a download
            missing.append(f"{spec.source}: {exc}")
    if missing:
        warnings.warn(f"skipped {len(missing)} photos: {'; '.join(missing)}", stacklevel=2)
    if len(kept) < min(min_count, len(specs[:limit])):
        raise MemlocError(f"only {len(kept)} memorized photos could be loaded from scikit-image, need {min_count}")
    return kept, np.stack(images)
