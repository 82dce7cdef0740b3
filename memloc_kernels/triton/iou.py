"""Popcount kernels on packed masks: per-mask set bits and the N x N intersection counts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ._bits import popcount32


@triton.jit
def _popcount_kernel(words_ptr, part_ptr, n, n_words, chunk, n_split,
                     BR: tl.constexpr, BLOCK: tl.constexpr, HW: tl.constexpr):
    """``part[row, split]`` = set bits of ``words[row, split * chunk : (split + 1) * chunk]`` for
    ``BR`` rows per program (short rows, e.g. a layer's mask rows, share one program)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r64 = tl.minimum(rows, n - 1).to(tl.int64)
    split = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    start = split.to(tl.int64) * chunk
    stop = tl.minimum(start + chunk, n_words)
    total = tl.zeros([BR, BLOCK], dtype=tl.int32)
    for j in range(start, stop, BLOCK):
        w = tl.load(words_ptr + r64[:, None] * n_words + (j + offs)[None, :], mask=(j + offs < stop)[None, :], other=0)
        total += popcount32(w, HW)
    tl.store(part_ptr + r64 * n_split + split, tl.sum(total.to(tl.int64), axis=1), mask=rows < n)


def mask_popcount_triton(words: torch.Tensor) -> torch.Tensor:
    """Set bits per row of ``words`` ``[N, W]`` int32 -> ``[N]`` int64.

    Short rows are taken several per program (about 4096 words per program step); long rows are
    split into pieces so that a few long masks still fill the GPU. The pieces' counts are summed
    by torch (integers: the order does not matter).
    """
    n, w = words.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=words.device)
    block = min(1024, _config.pow2_ceil(w))
    rows = max(1, min(4096 // block, _config.pow2_floor(n)))
    programs = -(-n // rows)
    split = max(1, min(-(-w // (4 * block)), -(-4 * _config.num_sms(words.device) // programs)))
    chunk = -(-w // split)
    part = torch.empty(n, split, dtype=torch.int64, device=words.device)
    _popcount_kernel[(programs, split)](words, part, n, w, chunk, split, BR=rows, BLOCK=block, HW=words.is_cuda,
                                       num_warps=4)
    return part.sum(dim=1)


@triton.jit
def _tile_pair(pair_ptr, n_words, chunk, BM: tl.constexpr):
    """This program's upper-triangle tile pair (bi <= bj), their rows and its K slice [k0, k1)."""
    pair = tl.program_id(0)
    bi = tl.load(pair_ptr + 2 * pair)
    bj = tl.load(pair_ptr + 2 * pair + 1)
    k0 = tl.program_id(1).to(tl.int64) * chunk
    return bi, bj, bi * BM + tl.arange(0, BM), bj * BM + tl.arange(0, BM), k0, tl.minimum(k0 + chunk, n_words)


@triton.jit
def _add_tile(out_ptr, acc, bi, bj, ra, rb, n):
    """Add a tile's int32 counts into ``out`` and its mirror (integer atomics: order-free)."""
    total = acc.to(tl.int64)
    on = (ra < n)[:, None] & (rb < n)[None, :]
    tl.atomic_add(out_ptr + ra.to(tl.int64)[:, None] * n + rb[None, :], total, mask=on, sem="relaxed")
    if bi != bj:
        tl.atomic_add(out_ptr + rb.to(tl.int64)[None, :] * n + ra[:, None], total, mask=on, sem="relaxed")


@triton.jit
def _intersections_kernel(words_ptr, out_ptr, pair_ptr, n, n_words, chunk,
                          BM: tl.constexpr, BK: tl.constexpr, HW: tl.constexpr):
    """One upper-triangle tile pair (bi <= bj) and one K slice: ``out[a, b] += popc(A[a] & A[b])``.

    A GEMM over 32-bit words with AND for the product and popcount + add for the sum, written as
    BK outer products per step so that every thread keeps its [BM, BM] sub-tile in registers
    and the K sum never crosses threads. The slice's counts are added into ``out`` with integer
    atomics (order-free, so deterministic), and the mirror tile gets the same counts.
    """
    bi, bj, ra, rb, k0, k1 = _tile_pair(pair_ptr, n_words, chunk, BM)
    k_full = k0 + (k1 - k0) // BK * BK
    # rows past n read row n - 1 (their counts are dropped below): no masks in the loop
    pa = words_ptr + tl.minimum(ra, n - 1).to(tl.int64) * n_words
    pb = words_ptr + tl.minimum(rb, n - 1).to(tl.int64) * n_words
    acc = tl.zeros([BM, BM], dtype=tl.int32)
    for j in range(k0, k_full, BK):
        for kk in tl.static_range(BK):
            acc += popcount32(tl.load(pa + (j + kk))[:, None] & tl.load(pb + (j + kk))[None, :], HW)
    for j in range(k_full, k1):
        acc += popcount32(tl.load(pa + j)[:, None] & tl.load(pb + j)[None, :], HW)
    _add_tile(out_ptr, acc, bi, bj, ra, rb, n)


@triton.jit
def _intersections_dot_kernel(words_ptr, out_ptr, pair_ptr, n, n_words, chunk,
                              BM: tl.constexpr, KW: tl.constexpr):
    """The same counts on the tensor cores: bits unpacked to int8 0/1 and multiplied (A @ B^T).

    ``popc(a & b)`` summed over words is the dot product of the two masks' bit vectors, so each
    K step unpacks ``KW`` words (32 * KW bits) of the BM rows of both tiles into int8 and runs an
    int8 x int8 -> int32 ``tl.dot``. The bit order inside the step is the same for A and B, which
    is all a dot product needs. Tiles and atomics as in ``_intersections_kernel``.
    """
    bi, bj, ra, rb, k0, k1 = _tile_pair(pair_ptr, n_words, chunk, BM)
    pa = words_ptr + tl.minimum(ra, n - 1).to(tl.int64) * n_words
    pb = words_ptr + tl.minimum(rb, n - 1).to(tl.int64) * n_words
    shifts = tl.arange(0, 32)
    acc = tl.zeros([BM, BM], dtype=tl.int32)
    for j in range(k0, k1, KW):
        kw = j + tl.arange(0, KW)
        a = tl.load(pa[:, None] + kw[None, :], mask=(kw < k1)[None, :], other=0)
        b = tl.load(pb[:, None] + kw[None, :], mask=(kw < k1)[None, :], other=0)
        a8 = tl.reshape(((a[:, :, None] >> shifts[None, None, :]) & 1).to(tl.int8), [BM, KW * 32])
        b8 = tl.reshape(((b[:, :, None] >> shifts[None, None, :]) & 1).to(tl.int8), [BM, KW * 32])
        acc = tl.dot(a8, tl.trans(b8), acc, out_dtype=tl.int32)
    _add_tile(out_ptr, acc, bi, bj, ra, rb, n)


#: Which intersections kernel runs: "dot" (tensor cores, int8) or "popcount" (CUDA cores).
IOU_KERNEL = "dot"


def mask_intersections_triton(words: torch.Tensor) -> torch.Tensor:
    """``out[a, b] = popcount(words[a] & words[b])`` for ``words`` ``[N, W]`` int32 -> ``[N, N]`` int64.

    Only tiles on and above the diagonal are computed (the matrix is symmetric). The K dim is
    split so that there are enough programs; each slice holds at most 2**25 words so that its
    int32 tile counts cannot overflow.
    """
    n, w = words.shape
    if w == 0:
        return torch.zeros(n, n, dtype=torch.int64, device=words.device)
    dot = IOU_KERNEL == "dot"
    if dot:  # tiles of 128 masks on the GPU (16 under the interpreter), 4 words = 128 bits per K step
        bm, bk = (128, 4) if words.is_cuda else (16, 1)
    else:
        bm, bk = (32, 8) if words.is_cuda else (16, 4)
    tiles = -(-n // bm)
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    target = 4 * _config.num_sms(words.device)
    split = max(1, min(-(-target // len(pairs)), -(-w // (64 * bk))))
    split = max(split, -(-w // (1 << 25)))
    chunk = -(-w // split)
    chunk = -(-chunk // bk) * bk
    split = -(-w // chunk)
    out = torch.zeros(n, n, dtype=torch.int64, device=words.device)
    table = _config.device_table(tuple(x for p in pairs for x in p), torch.int32, words.device)
    if dot:
        _intersections_dot_kernel[(len(pairs), split)](words, out, table, n, w, chunk, BM=bm, KW=bk, num_warps=8)
    else:
        _intersections_kernel[(len(pairs), split)](words, out, table, n, w, chunk, BM=bm, BK=bk,
                                                   HW=words.is_cuda, num_warps=4)
    return out
