"""The C++/OpenMP CPU backend: canonical-signature wrappers over the native module ``memloc_kernels._C``.

Tensors cross into C++ as ``data_ptr()`` addresses plus sizes and dtype codes (see
``csrc/README.md``); outputs are allocated here with torch. The kernels use
``torch.get_num_threads()`` threads, so ``torch.set_num_threads`` governs both.
"""

from __future__ import annotations

import torch

from ._native import _C, IMPORT_FAILURE, checked_ptr, dtype_code

_IMPORT_ERROR = (
    f"{IMPORT_FAILURE}; build it with `python setup.py build_ext --inplace` or reinstall without MEMLOC_SKIP_NATIVE=1"
    if IMPORT_FAILURE
    else ""
)

_ELEMENT_SIZES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def _dtype_code(t: torch.Tensor) -> int:
    return dtype_code("cpu", t)


def _ptr(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return checked_ptr("cpu", "the CPU", name, t, dtype)


def _threads() -> int:
    return torch.get_num_threads()


class CpuBackend:
    name = "cpu"
    device_note = "runs CPU tensors only"

    def availability(self) -> tuple[bool, str]:
        return (_C is not None), _IMPORT_ERROR

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def accumulate_sumsq(self, h, acc, group_size):
        rows, d_in = h.shape
        _C.accumulate_sumsq(
            _ptr("h", h), _dtype_code(h), rows, d_in, _ptr("acc", acc), _dtype_code(acc), group_size, _threads()
        )

    def geglu_sumsq(self, proj_out, acc, group_size):
        rows, two_d_ff = proj_out.shape
        h = torch.empty(rows, two_d_ff // 2, dtype=proj_out.dtype)
        _C.geglu_sumsq(
            _ptr("proj_out", proj_out),
            _dtype_code(proj_out),
            rows,
            two_d_ff // 2,
            _ptr("h", h),
            _ptr("acc", acc),
            _dtype_code(acc),
            group_size,
            _threads(),
        )
        return h

    def wanda_scores(self, weight, sumsq):
        d_out, d_in = weight.shape
        out = torch.empty(sumsq.shape[0], d_out, d_in, dtype=torch.float32)
        _C.wanda_scores(
            _ptr("weight", weight),
            _dtype_code(weight),
            d_out,
            d_in,
            _ptr("sumsq", sumsq, torch.float32),
            sumsq.shape[0],
            _ptr("out", out),
            _threads(),
        )
        return out

    def memorized_mask(self, weight, sumsq, null_sumsq, k, out):
        self.memorized_mask_multi([weight], [sumsq], [null_sumsq], [k], [out])

    def memorized_mask_multi(self, weights, sumsqs, null_sumsqs, ks, outs):
        names = ("weights", "dtypes", "d_outs", "d_ins", "sumsqs", "null_sumsqs", "Ss", "Ts", "outs")
        args = {name: [] for name in names}
        for i, (weight, sumsq, null_sumsq, out) in enumerate(zip(weights, sumsqs, null_sumsqs, outs)):
            d_out, d_in = weight.shape
            S, T, _ = sumsq.shape
            if tuple(null_sumsq.shape) != (S, T, d_in) or tuple(out.shape) != (S, d_out, (d_in + 31) // 32):
                raise ValueError(f"memorized_mask: layer {i}: null_sumsq/out shapes do not match sumsq and weight")
            args["weights"].append(_ptr("weight", weight))
            args["dtypes"].append(_dtype_code(weight))
            args["d_outs"].append(d_out)
            args["d_ins"].append(d_in)
            args["sumsqs"].append(_ptr("sumsq", sumsq, torch.float32))
            args["null_sumsqs"].append(_ptr("null_sumsq", null_sumsq, torch.float32))
            args["Ss"].append(S)
            args["Ts"].append(T)
            args["outs"].append(_ptr("out", out, torch.int32))
        _C.memorized_mask_multi(ks=list(ks), threads=_threads(), **args)

    def pack_mask(self, mask):
        rows, d_in = mask.shape
        words = torch.empty(rows, (d_in + 31) // 32, dtype=torch.int32)
        _C.pack_mask(_ptr("mask", mask, torch.bool), rows, d_in, _ptr("words", words), _threads())
        return words

    def unpack_mask(self, words, d_in):
        rows = words.shape[0]
        if words.shape[1] != (d_in + 31) // 32:
            raise ValueError(f"words must have {(d_in + 31) // 32} columns for d_in={d_in}, got {words.shape[1]}")
        mask = torch.empty(rows, d_in, dtype=torch.bool)
        _C.unpack_mask(_ptr("words", words, torch.int32), rows, d_in, _ptr("mask", mask), _threads())
        return mask

    def apply_mask(self, weight, words):
        d_out, d_in = weight.shape
        wp = _ptr("words", words, torch.int32)
        count = _C.mask_count(wp, d_out, d_in, _threads())
        removed = torch.empty(count, dtype=weight.dtype)
        _C.apply_mask(
            _ptr("weight", weight), _ELEMENT_SIZES[weight.dtype], d_out, d_in, wp, _ptr("removed", removed), count,
            _threads(),
        )
        return removed

    def restore(self, weight, words, removed):
        d_out, d_in = weight.shape
        _C.restore(
            _ptr("weight", weight),
            _ELEMENT_SIZES[weight.dtype],
            d_out,
            d_in,
            _ptr("words", words, torch.int32),
            _ptr("removed", removed, weight.dtype),
            removed.numel(),
            _threads(),
        )

    def mask_popcount(self, words):
        n, w = words.shape
        out = torch.empty(n, dtype=torch.int64)
        _C.mask_popcount(_ptr("words", words, torch.int32), n, w, _ptr("out", out), _threads())
        return out

    def mask_intersections(self, words):
        n, w = words.shape
        out = torch.empty(n, n, dtype=torch.int64)
        _C.mask_intersections(_ptr("words", words, torch.int32), n, w, _ptr("out", out), _threads())
        return out


BACKEND = CpuBackend()
