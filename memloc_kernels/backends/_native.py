"""Shared by the cpu and cuda backends: the native module ``memloc_kernels._C``, dtype codes, checked pointers."""

from __future__ import annotations

import torch

try:
    from .. import _C
except Exception as exc:  # not built (MEMLOC_SKIP_NATIVE=1), or built for another Python/platform
    _C = None
    IMPORT_FAILURE = f"memloc_kernels._C did not import ({type(exc).__name__}: {exc})"
else:
    IMPORT_FAILURE = ""


def dtype_code(backend: str, t: torch.Tensor) -> int:
    """The ``_C`` code of ``t``'s floating dtype."""
    codes = {
        torch.float16: _C.FLOAT16,
        torch.bfloat16: _C.BFLOAT16,
        torch.float32: _C.FLOAT32,
        torch.float64: _C.FLOAT64,
    }
    if t.dtype not in codes:
        raise TypeError(f"the {backend} backend has no kernel for {t.dtype}")
    return codes[t.dtype]


def checked_ptr(backend: str, where: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Address of a tensor's data, after the checks that keep raw-pointer access in bounds.

    ``t`` must be on a device of type ``backend`` (``where`` names it in the error), contiguous, and
    of ``dtype`` when one is given.
    """
    if t.device.type != backend:
        raise ValueError(f"{name} must be on {where} for the {backend} backend, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous for the {backend} backend")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} for the {backend} backend, got {t.dtype}")
    return t.data_ptr()
