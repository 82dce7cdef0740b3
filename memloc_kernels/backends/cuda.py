"""The CUDA C++ backend: canonical-signature adapters over the ``cuda_*`` entry points of ``memloc_kernels._C``.

Tensors cross into C++ as ``data_ptr()`` addresses plus sizes, dtype codes, the device index and
the current CUDA stream (see ``csrc/cuda/README.md``); outputs and scratch are allocated here
with torch, so they come from torch's caching allocator and are stream-ordered with the
kernels. ``memloc_kernels.ops`` has validated and canonicalized every input before it gets here.
"""

from __future__ import annotations

import os

import torch

from .. import reference as ref
from .._counters import device_counters
from ._native import _C, IMPORT_FAILURE, checked_ptr, dtype_code

_IMPORT_ERROR = (
    f"{IMPORT_FAILURE}; build it with `MEMLOC_CUDA=1 python setup.py build_ext --inplace`" if IMPORT_FAILURE else ""
)


def _dtype_code(t: torch.Tensor) -> int:
    return dtype_code("cuda", t)


def _ptr(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return checked_ptr("cuda", "a CUDA device", name, t, dtype)


def _launch_args(t: torch.Tensor) -> tuple[int, int]:
    """(stream handle, device index) for kernels on ``t``'s device: torch's current stream there."""
    return torch.cuda.current_stream(t.device).cuda_stream, t.device.index


def _n_words(d_in: int) -> int:
    return (d_in + 31) // 32


def _norms(sumsqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """IEEE square roots of float32 sums of squares, as the reference's torch.sqrt takes them.

    ``torch._foreach_sqrt`` does every tensor in one or a few launches; a correctly rounded sqrt
    has one answer, so its bits equal ``torch.sqrt``'s (the tests compare masks with the reference).
    """
    return list(torch._foreach_sqrt(sumsqs))


def warp_kernel_takes(d_in: int, k: int) -> bool:
    """Whether ``memorized_mask``'s warp kernel (``csrc/cuda/mask_warp.cu``) takes a layer of this
    width and k (its rule, less the 16-byte alignment of the rows, which fresh torch tensors have):
    d_in a multiple of 8 up to 8192, k at most 96 and at most d_in / 8. Other layers run the block
    kernel (``memorized_mask.cu``)."""
    return d_in % 8 == 0 and d_in <= 8192 and k <= 96 and k <= d_in // 8


def _mask_counters(device: torch.device) -> torch.Tensor:
    return device_counters("cuda.mask_warp", 2, device)


def exact_path_counter(device: torch.device) -> torch.Tensor:
    """int32 ``[1]`` on ``device`` (a view): how many (row, vector) problems the warp kernel of
    ``memorized_mask`` decided by its exact path (ties at the k-th place, or a bound it could not
    tighten); every call adds to it, benchmarks and tests read and reset it."""
    return _mask_counters(device)[:1]


def loose_bound_counter(device: torch.device) -> torch.Tensor:
    """int32 ``[1]`` on ``device`` (a view): how many (row, vector) problems of batched calls left the
    warp kernel's bound path (pair-maxima bounds too loose to show k scores, or no bound window)
    for its block-maxima path."""
    return _mask_counters(device)[1:]


def _pair_maxima(norms: torch.Tensor) -> torch.Tensor:
    """``[..., d_in // 2]``: the larger of each column pair of ``|norms|``, NaN where either is not
    finite (``csrc/cuda/pair_norms.cu``, one launch). The warp kernel's bound path multiplies these
    by the pair maxima of ``|W|`` (``mask_warp.cuh``)."""
    out = torch.empty(*norms.shape[:-1], norms.shape[-1] // 2, dtype=torch.float32, device=norms.device)
    stream, device = _launch_args(norms)
    _C.cuda_pair_norm_maxima(_ptr("norms", norms, torch.float32), out.numel(), out.data_ptr(), stream, device)
    return out


def _bound_path_on() -> bool:
    return os.environ.get("MEMLOC_CUDA_MASK_BOUNDS", "1") != "0"


def _bound_path_takes(d_in: int, k: int) -> bool:
    """Whether a batched layer of the warp kernel takes its bound path (``kBoundMaxK`` in
    ``mask_warp.cu``: k at most 64), so that pair maxima are computed only where they are read."""
    return warp_kernel_takes(d_in, k) and k <= 64


class CudaBackend:
    name = "cuda"
    device_note = "runs CUDA tensors only, with memloc_kernels._C built with MEMLOC_CUDA=1"

    def availability(self) -> tuple[bool, str]:
        if _C is None:
            return False, _IMPORT_ERROR
        if not hasattr(_C, "cuda_memorized_mask"):
            return False, "memloc_kernels._C was built without CUDA (rebuild with MEMLOC_CUDA=1)"
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False (no CUDA device or a CPU-only torch)"
        return True, ""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def accumulate_sumsq(self, h, acc, group_size):
        """Deterministic: fixed row chunks summed in a fixed order (two stages, no atomics)."""
        rows, d_in = h.shape
        acc_code = _dtype_code(acc)
        n_bytes = _C.cuda_accumulate_sumsq_workspace_bytes(rows, d_in, group_size, acc_code)
        workspace = torch.empty(n_bytes, dtype=torch.uint8, device=h.device)
        stream, device = _launch_args(h)
        _C.cuda_accumulate_sumsq(
            _ptr("h", h),
            _dtype_code(h),
            rows,
            d_in,
            _ptr("acc", acc),
            acc_code,
            group_size,
            workspace.data_ptr() if n_bytes else 0,
            n_bytes,
            stream,
            device,
        )

    def wanda_scores(self, weight, sumsq):
        d_out, d_in = weight.shape
        S = sumsq.shape[0]
        norms = _norms([sumsq])[0]
        out = torch.empty(S, d_out, d_in, dtype=torch.float32, device=weight.device)
        stream, device = _launch_args(weight)
        _C.cuda_wanda_scores(
            _ptr("weight", weight),
            _dtype_code(weight),
            d_out,
            d_in,
            _ptr("sumsq", norms, torch.float32),
            S,
            out.data_ptr(),
            stream,
            device,
        )
        return out

    def memorized_mask(self, weight, sumsq, null_sumsq, k, out):
        self.memorized_mask_multi([weight], [sumsq], [null_sumsq], [k], [out])

    def memorized_mask_multi(self, weights, sumsqs, null_sumsqs, ks, outs):
        """All layers in few launches: the warp kernel (``mask_warp.cu``) for the layers it takes
        (:func:`warp_kernel_takes`; one launch per chunk class), the block kernel for the others
        (one launch per shape class). Layers wider than the block kernel's limit
        (``_C.cuda_memorized_mask_max_d_in()``, 16384) run the reference's torch code instead.
        ``MEMLOC_CUDA_MASK=block`` / ``warp`` in the environment forces the kernel (read per call)."""
        max_d_in = _C.cuda_memorized_mask_max_d_in()
        layers = []
        for weight, sumsq, null_sumsq, k, out in zip(weights, sumsqs, null_sumsqs, ks, outs):
            d_out, d_in = weight.shape
            S, T, _ = sumsq.shape
            if tuple(null_sumsq.shape) != (S, T, d_in) or tuple(out.shape) != (S, d_out, _n_words(d_in)):
                raise ValueError("memorized_mask: null_sumsq/out shapes do not match sumsq and weight")
            _ptr("sumsq", sumsq, torch.float32)
            _ptr("null_sumsq", null_sumsq, torch.float32)
            if d_in > max_d_in:
                mask = ref.memorized_mask_topk(weight, sumsq, null_sumsq, k)
                out |= ref.pack_mask(mask.reshape(-1, d_in)).reshape(out.shape)
            else:
                layers.append((weight, sumsq, null_sumsq, k, out))
        if not layers:
            return
        # One multi-tensor launch for every square root (IEEE sqrt: the bits of torch.sqrt). The
        # list keeps the norms allocated until the kernels are enqueued; torch then frees them in
        # stream order.
        norms = _norms([layer[1] for layer in layers] + [layer[2] for layer in layers])
        n = len(layers)
        # The warp kernel's bound path (batched calls) reads the pair maxima of the norms.
        bounds = _bound_path_on()
        pairs = [_pair_maxima(t) if bounds and t.shape[0] * t.shape[1] > 1 and _bound_path_takes(t.shape[-1], k)
                 else None for t, (*_, k, _) in zip(norms[:n], layers)]
        stream, device = _launch_args(weights[0])
        _C.cuda_memorized_mask_multi(
            [_ptr("weight", w) for w, *_ in layers],
            [_dtype_code(w) for w, *_ in layers],
            [w.shape[0] for w, *_ in layers],
            [w.shape[1] for w, *_ in layers],
            [t.data_ptr() for t in norms[:n]],
            [t.data_ptr() for t in norms[n:]],
            [s.shape[0] for _, s, *_ in layers],
            [s.shape[1] for _, s, *_ in layers],
            [k for *_, k, _ in layers],
            [_ptr("out", out, torch.int32) for *_, out in layers],
            stream,
            device,
            _mask_counters(weights[0].device).data_ptr(),
            [0 if p is None else p.data_ptr() for p in pairs],
        )

    def pack_mask(self, mask):
        rows, d_in = mask.shape
        words = torch.empty(rows, _n_words(d_in), dtype=torch.int32, device=mask.device)
        stream, device = _launch_args(mask)
        _C.cuda_pack_mask(_ptr("mask", mask, torch.bool), rows, d_in, _ptr("words", words), stream, device)
        return words

    def unpack_mask(self, words, d_in):
        rows, n_words = words.shape
        if n_words != _n_words(d_in):
            raise ValueError(f"unpack_mask: words must have {_n_words(d_in)} columns for d_in={d_in}, got {n_words}")
        mask = torch.empty(rows, d_in, dtype=torch.bool, device=words.device)
        stream, device = _launch_args(words)
        _C.cuda_unpack_mask(_ptr("words", words, torch.int32), rows, d_in, _ptr("mask", mask), stream, device)
        return mask

    def _offsets(self, weight, words) -> tuple[torch.Tensor, int]:
        """Exclusive scan of the per-row counts of set bits (bits past d_in ignored), and their total."""
        d_out, d_in = weight.shape
        if tuple(words.shape) != (d_out, _n_words(d_in)):
            raise ValueError(f"mask words must have shape [{d_out}, {_n_words(d_in)}], got {tuple(words.shape)}")
        counts = torch.empty(d_out, dtype=torch.int64, device=weight.device)
        stream, device = _launch_args(weight)
        _C.cuda_mask_popcount(
            _ptr("words", words, torch.int32), d_out, _n_words(d_in), d_in, counts.data_ptr(), stream, device
        )
        ends = torch.cumsum(counts, dim=0)
        return ends - counts, int(ends[-1])  # the total syncs: it sizes the removed values

    def _apply_mask_launch(self, weight, words, offsets, removed, total: int, restore: bool) -> None:
        """One ``cuda_apply_mask`` launch: move the selected weights into ``removed`` (or back, ``restore``)."""
        d_out, d_in = weight.shape
        stream, device = _launch_args(weight)
        _C.cuda_apply_mask(
            _ptr("weight", weight),
            _dtype_code(weight),
            d_out,
            d_in,
            words.data_ptr(),
            offsets.data_ptr(),
            removed.data_ptr() if total else 0,
            restore,
            stream,
            device,
        )

    def apply_mask(self, weight, words):
        offsets, total = self._offsets(weight, words)
        removed = torch.empty(total, dtype=weight.dtype, device=weight.device)
        self._apply_mask_launch(weight, words, offsets, removed, total, restore=False)
        return removed

    def restore(self, weight, words, removed):
        offsets, total = self._offsets(weight, words)
        if removed.dtype != weight.dtype or removed.device != weight.device:
            raise ValueError(
                f"removed must be {weight.dtype} on {weight.device}, got {removed.dtype} on {removed.device}"
            )
        if removed.numel() != total:
            raise ValueError(f"removed holds {removed.numel()} values but the mask selects {total}")
        self._apply_mask_launch(weight, words, offsets, removed.contiguous(), total, restore=True)

    def mask_popcount(self, words):
        n, w = words.shape
        out = torch.empty(n, dtype=torch.int64, device=words.device)
        stream, device = _launch_args(words)
        _C.cuda_mask_popcount(_ptr("words", words, torch.int32), n, w, -1, out.data_ptr(), stream, device)
        return out

    def mask_intersections(self, words):
        n, w = words.shape
        out = torch.empty(n, n, dtype=torch.int64, device=words.device)
        stream, device = _launch_args(words)
        _C.cuda_mask_intersections(_ptr("words", words, torch.int32), n, w, out.data_ptr(), stream, device)
        return out


BACKEND = CudaBackend()
