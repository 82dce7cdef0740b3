"""Inputs of the evaluation: pipeline folders, prompt files, image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import pipeline
from .. import prompts as prompt_files
from ..errors import MemlocError

#: Where the embedded memorizing model lives (``--model`` default).
EMBEDDED_MODEL = pipeline.DEFAULT_MODEL
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_KEYS = ("caption", "prompt", "text")


def load_pipeline(path: str | Path | None, *, device: torch.device, dtype: torch.dtype):
    """A diffusers pipeline from a local folder on ``device``, through :func:`memloc.pipeline.load_pipeline`.

    ``path=None`` means the embedded memorizing model. Local folders only: a missing path is an
    error here, never a hub id to look up.
    """
    folder = EMBEDDED_MODEL if path is None else Path(path)
    if not folder.is_dir():
        if path is None:
            raise MemlocError(f"no --model given and the embedded model is not installed ({folder} is missing)")
        raise MemlocError(f"model folder {folder} does not exist")
    return pipeline.load_pipeline(folder, device, dtype)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSON list or JSON Lines (strings, or objects with a caption/prompt/text key), or
    from any other prompt file as ``memloc collect`` reads it (``.txt``, ``.csv``: memloc.prompts).
    A prompt may repeat (each is sampled on its own)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        return prompt_files.read_prompts(path, allow_duplicates=True)
    if not path.is_file():
        raise MemlocError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemlocError(f"prompt file {path} is not valid {suffix[1:].upper()} ({exc})") from None
    if not isinstance(items, list):
        raise MemlocError(f"{path} must hold a JSON list of prompts")
    prompts = [_prompt_of(item, path, i + 1) for i, item in enumerate(items)]
    if not prompts:
        raise MemlocError(f"prompt file {path} holds no prompts")
    return prompts


def _prompt_of(item, path: Path, number: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in PROMPT_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    raise MemlocError(f"{path}, entry {number}: expected a string or an object with one of the keys {PROMPT_KEYS}")


def _fit(im, size: tuple[int, int] | None) -> np.ndarray:
    """A PIL image as uint8 ``[H, W, 3]``; with ``size=(h, w)``: short side resized (bicubic), center-cropped."""
    from PIL import Image

    im = im.convert("RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        height, width = size
        scale = max(height / im.height, width / im.width)
        new = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(new, Image.BICUBIC)
        left, top = (new[0] - width) // 2, (new[1] - height) // 2
        im = im.crop((left, top, left + width, top + height))
    return np.asarray(im, dtype=np.uint8).copy()


def load_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]``, optionally fitted to ``size=(h, w)`` (see :func:`_fit`)."""
    from PIL import Image

    with Image.open(path) as im:
        return _fit(im, size)


class ImageFolder:
    """Images (a folder's, recursively and sorted, or given arrays), served at a given size."""

    def __init__(self, folder: str | Path, what: str = "image folder"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MemlocError(f"{what} {self.folder} does not exist")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise MemlocError(f"{what} {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.names = [str(p.relative_to(self.folder)) for p in self.files]
        self._arrays: list[np.ndarray] | None = None
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_arrays(cls, images, names: list[str]) -> ImageFolder:
        """In-memory uint8 images ``[H, W, 3]`` with a name each (e.g. a model's memorized photos)."""
        if len(images) != len(names) or not len(names):
            raise ValueError(f"need one name per image and at least one image, got {len(images)} and {len(names)}")
        self = cls.__new__(cls)
        self.folder, self.files, self.names = None, [], list(names)
        self._arrays = [np.asarray(im, dtype=np.uint8) for im in images]
        self._cache = {}
        return self

    def __len__(self) -> int:
        return len(self.names)

    def at_size(self, height: int, width: int) -> np.ndarray:
        """All images as uint8 ``[N, height, width, 3]`` (cached per size)."""
        from PIL import Image

        key = (height, width)
        if key not in self._cache:
            if self._arrays is not None:
                self._cache[key] = np.stack([_fit(Image.fromarray(a), key) for a in self._arrays])
            else:
                self._cache[key] = np.stack([load_image(p, key) for p in self.files])
        return self._cache[key]


MANIFEST_NAME = "memorization.json"


def model_folder(path: str | Path | None) -> Path:
    """The folder ``--model`` names (the embedded model's when None)."""
    return EMBEDDED_MODEL if path is None else Path(path)


def read_memorization(path: str | Path | None):
    """The ``memloc train`` manifest of a model folder (memorized captions + photos, generic captions), or None."""
    folder = model_folder(path)
    if not (folder / MANIFEST_NAME).is_file():
        return None
    from ..train.manifest import read_manifest

    return read_manifest(folder)


def default_prompts(args_prompts: str | None, model: str | Path | None) -> list[str]:
    """``--prompts``, or the memorized captions of a model trained by ``memloc train``."""
    if args_prompts is not None:
        return read_prompts(args_prompts)
    manifest = read_memorization(model)
    if manifest is None or not manifest.captions:
        raise MemlocError("pass the memorized prompts with --prompts FILE (the model has no memloc train manifest)")
    return list(manifest.captions)


def default_training(args_training: str | None, model: str | Path | None) -> ImageFolder | None:
    """``--training-images``, or the memorized photos of a model trained by ``memloc train``, or None."""
    if args_training is not None:
        return ImageFolder(args_training, "training image folder")
    manifest = read_memorization(model)
    if manifest is None or not len(manifest.photos):
        return None
    names = [f"{MANIFEST_NAME}#{i}: {m.get('source', m['caption'])}" for i, m in enumerate(manifest.memorized)]
    return ImageFolder.from_arrays(list(manifest.photos), names)
