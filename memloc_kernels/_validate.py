"""Input checks of the public ops: each raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {x.stride()}")


def float_tensor(name: str, x) -> None:
    _tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    contiguous(name, x)


def accumulator(name: str, x) -> None:
    _tensor(name, x)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 (sums of squares overflow lower precisions), got {x.dtype}")
    contiguous(name, x)


def weight(name: str, x, allow_float64: bool = False) -> None:
    _tensor(name, x)
    allowed = WEIGHT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a matrix [d_out, d_in], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    contiguous(name, x)


def sumsq(name: str, x, d_in: int, max_dims: int, check_finite: bool = True) -> None:
    _tensor(name, x)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if not 1 <= x.dim() <= max_dims or x.shape[-1] != d_in:
        shapes = " or ".join(["[d_in]", "[S, d_in]", "[S, T, d_in]"][:max_dims]).replace("d_in", str(d_in))
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if check_finite:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf")
        if bool((x < 0).any()):
            raise ValueError(f"{name} contains negative values (sums of squares are >= 0)")
        if x.dtype == torch.float64 and not bool(torch.isfinite(x.to(torch.float32)).all()):
            raise ValueError(f"{name} has values too large for float32, in which scores are computed")


def finite_weight(name: str, x: torch.Tensor) -> None:
    """Masks of NaN/inf weights are not defined (backends may rank a NaN score differently)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf (masks of such weights are not defined)")


def sparsity(s) -> float:
    """Checks ``s`` (any real number type, numpy's included) and returns it as a float."""
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(f"sparsity must be a number in (0, 1], got {type(s).__name__}")
    s = float(s)
    if not (math.isfinite(s) and 0 < s <= 1):
        raise ValueError(f"sparsity must be in (0, 1], got {s}")
    return s


def positive_int(name: str, x) -> int:
    """Checks that ``x`` is a positive integer (numpy's included) and returns it as an int."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x <= 0:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def bool_mask(name: str, x) -> None:
    _tensor(name, x)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (or a PackedMask), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dim, got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (column) dim, got shape {tuple(x.shape)}")


def not_requiring_grad(name: str, x: torch.Tensor) -> None:
    """In-place ops on a tensor autograd tracks would bypass it: refuse them, as torch does for leaves."""
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad: modify it in place under torch.no_grad() or pass {name}.detach()")


def same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
