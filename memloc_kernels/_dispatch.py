"""Backend registry and the one dispatch rule of the ops API.

A backend is an object with a ``name``, an ``availability()`` that says whether it can run here
(and why not), a ``supports(device)`` test, and one method per op it implements, with the
canonical signatures listed in ``memloc_kernels/backends/README.md``. The public functions in
``memloc_kernels.ops`` validate and canonicalize their inputs, then call :func:`select`.

The rule: an explicitly named backend must exist, be available and support the tensors' device,
else :class:`BackendUnavailableError` names it and says why. ``"auto"`` takes, for the op and the
device type, the first backend of :data:`AUTO_ORDER` that implements the op, is available and
supports the device; the reference backend implements everything and runs everywhere, so
``auto`` never fails for lack of an optional backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")

# Per op and device type, the order in which "auto" tries backends. For CUDA tensors this is the
# ranking measured on an H200 (BENCHMARKS.md, "GPU backends side by side"), and for memorized_mask
# on an H100 (twelfth session, commit 4b3c392; cuda = its warp kernel, mask_warp.cu; thirteenth
# session, 8bfbecd, bound path: 61.1 us / 30.1 us per vector on an H100, 54.0 / 29.4-29.9 on an H200):
#   memorized_mask  SD1.5 x1: cuda 61.5 us, triton 123.7 us; batched: cuda 30.5, triton 96.5 us/vector
#                   (the block kernel it replaced for these layers: 187.1 / 149.9 us); layers the
#                   warp kernel does not take go to Triton under "auto" (select_memorized_mask)
#   mask_iou (mask_intersections) 1000 SD1.5 masks: cuda 0.24 s, triton 0.65 s (popcount kernel)
#   apply_mask / restore 76800x5120 at 1 %: cuda 293 / 264 us, triton 2135 / 1324 us (scan kernel)
#   accumulate_sumsq 32x4096x1280: triton 142 us, cuda 172 us
#   geglu_sumsq: triton only (cuda has no kernel)
# Ops not listed (pack/unpack, wanda_scores) were not measured and use the default order.
_CUDA_FIRST = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_TRITON_FIRST = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "default": _TRITON_FIRST,
    "memorized_mask": _CUDA_FIRST,
    "mask_intersections": _CUDA_FIRST,
    "mask_popcount": _CUDA_FIRST,
    "apply_mask": _CUDA_FIRST,
    "restore": _CUDA_FIRST,
}

_MODULES = {
    "reference": "memloc_kernels.backends.reference",
    "cpu": "memloc_kernels.backends.cpu",
    "triton": "memloc_kernels.backends.triton",
    "cuda": "memloc_kernels.backends.cuda",
}
_loaded: dict[str, Any] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these tensors here."""


def get_backend(name: str) -> Any:
    """The backend object called ``name`` (imported on first use)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(('auto',) + BACKEND_NAMES)}, got {name!r}")
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            _loaded[name] = module.BACKEND
        except Exception as exc:  # an optional backend must never break the package import
            _loaded[name] = _Missing(name, f"{type(exc).__name__}: {exc}")
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in :data:`BACKEND_NAMES` order."""
    return [name for name in BACKEND_NAMES if get_backend(name).availability()[0]]


def select(op: str, backend: str, device: torch.device) -> Any:
    """The backend that runs ``op`` on ``device`` under the dispatch rule above."""
    if backend == "auto":
        orders = AUTO_ORDER.get(op, AUTO_ORDER["default"])
        return _first_usable(op, orders.get(device.type, AUTO_ORDER["default"].get(device.type, ())), device)
    candidate = get_backend(backend)
    ok, reason = candidate.availability()
    if not ok:
        raise BackendUnavailableError(f"backend {backend!r} is not available: {reason}")
    if not candidate.supports(device):
        raise BackendUnavailableError(f"backend {backend!r} cannot run tensors on {device}: {candidate.device_note}")
    if not hasattr(candidate, op):
        raise BackendUnavailableError(f"backend {backend!r} does not implement {op}")
    return candidate


def select_memorized_mask(backend: str, device: torch.device, shapes: Sequence[tuple[int, int]]) -> Any:
    """:func:`select` for ``memorized_mask`` over layers of ``(d_in, k)``: under ``"auto"`` the CUDA
    backend only when its warp kernel takes every layer (it is the fast one; its block kernel, for
    the rest, is slower than Triton's: BENCHMARKS.md), else the default order (Triton first)."""
    impl = select("memorized_mask", backend, device)
    if backend == "auto" and getattr(impl, "name", "") == "cuda":
        from .backends.cuda import warp_kernel_takes

        if not all(warp_kernel_takes(d_in, k) for d_in, k in shapes):
            return _first_usable("memorized_mask", AUTO_ORDER["default"].get(device.type, ()), device)
    return impl


def _first_usable(op: str, order: Sequence[str], device: torch.device) -> Any:
    """The first backend in ``order`` that implements ``op``, is available and runs on ``device``;
    the reference (which runs everything everywhere) when none does."""
    for name in order:
        candidate = get_backend(name)
        if hasattr(candidate, op) and candidate.availability()[0] and candidate.supports(device):
            return candidate
    return get_backend("reference")


class _Missing:
    """Stands in for a backend whose module failed to import."""

    device_note = "its module did not import"

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason

    def availability(self) -> tuple[bool, str]:
        return False, self._reason

    def supports(self, device: torch.device) -> bool:
        return False
