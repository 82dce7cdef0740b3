"""The one place where the evaluation applies a pruning mask file: a hook into the driver's memloc.prune.

The mask format (safetensors of packed words per layer + JSON metadata) belongs to the driver, so
the evaluation does not read it. It calls ``memloc.prune.apply_mask_file(pipe, path, backend=...)``
when the driver offers that, else composes the driver's ``apply_masks(denoiser_of(pipe),
read_mask_file(path), None, backend, source)`` (the union of the file's subsets, as ``memloc prune``
applies by default). Either prunes ``pipe`` in place. Without the driver, evaluate an
already-pruned pipeline folder (``--pruned-model``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from ..errors import MemlocError

DRIVER_MODULE = "memloc.prune"


def driver_apply(mask_path: str | Path) -> Callable:
    """``apply(pipe, path, backend=...)`` from the driver, checked before any long work; MemlocError if absent."""
    path = Path(mask_path)
    if not path.is_file():
        raise MemlocError(f"mask file {path} does not exist")
    try:
        driver = importlib.import_module(DRIVER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (DRIVER_MODULE, "memloc"):
            raise
        raise MemlocError(
            f"--mask needs {DRIVER_MODULE}, which this installation lacks; prune with `memloc prune` and "
            "pass the pruned pipeline folder with --pruned-model instead"
        ) from None
    if callable(getattr(driver, "apply_mask_file", None)):
        return driver.apply_mask_file
    if all(callable(getattr(driver, name, None)) for name in ("apply_masks", "read_mask_file", "denoiser_of")):

        def apply(pipe, path: Path, backend: str = "auto") -> None:
            source = getattr(pipe, "memloc_source", None)
            driver.apply_masks(driver.denoiser_of(pipe), driver.read_mask_file(path), None, backend, source)

        return apply
    raise MemlocError(f"{DRIVER_MODULE} offers no way to apply a mask file here; pass --pruned-model instead")


def check_mask_for(pipe, mask_path: str | Path) -> None:
    """Refuse, before any sampling, a mask file made for another model than ``pipe``'s (when the
    driver offers the check; otherwise applying it checks)."""
    try:
        driver = importlib.import_module(DRIVER_MODULE)
    except ModuleNotFoundError:
        return
    needed = ("read_mask_file", "denoiser_of", "find_ffn_layers", "identity", "check_identity")
    if not all(callable(getattr(driver, name, None)) for name in needed):
        return
    denoiser = driver.denoiser_of(pipe)
    actual = driver.identity(denoiser, driver.find_ffn_layers(denoiser), getattr(pipe, "memloc_source", None))
    driver.check_identity(driver.read_mask_file(mask_path).meta["model"], actual, f"mask file {mask_path}")


def apply_mask_file(pipe, mask_path: str | Path, *, backend: str = "auto") -> None:
    """Prune ``pipe`` in place with the mask file at ``mask_path``, through the driver."""
    driver_apply(mask_path)(pipe, Path(mask_path), backend=backend)
