"""memorized_mask, streaming kernels: one-warp programs stream each row; exact top-k from a short list.

Why not the tile kernel (``mask.py``): it holds a whole row in registers, so an SM holds only 8-12
warps and each row is a long chain of block barriers (docs/TRITON_MASK_NOTES.md). Here a program
is one warp that streams the row in chunks, so every reduction is a warp shuffle and the register
count (capped at 128) lets 16 programs share an SM. Every layer of a launch shares one kernel:
d_in, k and the offsets come from small tables; work items are ordered widest rows first.

Default, ``_blocks_mask_kernel`` (variant "blocks"), per (row, statistics vector):
  1. pass 1: scores ``|W| * norm`` chunk by chunk (loads through Triton's software pipeliner, 3
     chunks ahead); ``gmax[j]`` = the largest score among columns
     ``j, j + CH, ...`` (CH >= k strided groups), and the maximum of every aligned 8-column block,
     stored to the program's scratch;
  2. bound: a few bisection steps on the float bits of ``gmax`` give ``lo`` with >= k group maxima
     >= lo, hence >= k scores >= lo (scores are >= 0, so their int32 bit patterns order like the
     floats);
  3. the blocks whose maximum reaches lo (~k of them) are listed in column order and gathered as a
     ``[CAPB, 8]`` tile (CAPB >= 2k + 8, a power of two), the scores recomputed with the same
     operations (bit-identical). Option ``refine`` (off: measured slower, BENCHMARKS.md): a tile of
     ~k + k/8 blocks, and a problem with more candidate blocks first raises lo by a bisection on the
     block maxima until k to CAPB blocks reach it (``stats[1]`` counts these);
  4. exact selection: the k-th largest block maximum (bisection over the listed blocks), then the
     smallest scores dropped one distinct value at a time while >= k remain; equal scores at the
     k-th place go to the lower column (a cumsum over the tile, which is in column order);
  5. the null comparison for the selected entries, and one ``atomic_or`` per block (a block lies
     in one mask word; OR is order-free, so deterministic, and unions over timesteps for free).
Variant "list" (``_stream_mask_kernel``): pass 2 streams the whole row again and appends every
score >= lo to a list in column order, then bisects on the list. Slower on the H200 (196 vs 143
us for SD1.5): Triton lays the masked scatter out one element per lane, so its scan is costly.
A problem that overflows its list or tile even so (many equal scores >= the bound, e.g. a zero row) takes
an exact streaming path in the same program (``_stream_exact``: bisection over the whole row, one
pass per step), counted in ``stats[0]`` so that benchmarks and tests can see it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._counters import device_counters
from . import _config


@triton.jit
def _scores(w_rows, n_rows, c, d_in, row_ok, vec_ok, EVEN: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
            CH: tl.constexpr):
    """Scores of columns ``c`` ``[CH]`` for R rows x V vectors as ``[V * R, CH]`` (padding: -1)."""
    if EVEN:
        w = tl.load(w_rows + c[None, :], mask=row_ok[:, None], other=0.0)
        n = tl.load(n_rows + c[None, :], mask=vec_ok[:, None], other=0.0)
    else:
        cm = c < d_in
        w = tl.load(w_rows + c[None, :], mask=row_ok[:, None] & cm[None, :], other=0.0)
        n = tl.load(n_rows + c[None, :], mask=vec_ok[:, None] & cm[None, :], other=0.0)
    s = tl.abs(w.to(tl.float32))[None, :, :] * n[:, None, :]  # [V, R, CH]
    s = tl.reshape(s, [V * R, CH])
    if not EVEN:
        s = tl.where((c < d_in)[None, :], s, -1.0)
    return s


@triton.jit
def _stream_exact(w_row, n_row, z_row, out_row, d_in, k, CH: tl.constexpr):
    """Exact top-k + null test + OR for one (row, vector), streaming the row once per step."""
    cols = tl.arange(0, CH)
    # invariant: count(bits >= lo) >= k (every real score is >= 0), count(bits >= hi) < k
    top = -1
    for c0 in range(0, d_in, CH):
        c = c0 + cols
        s = tl.abs(tl.load(w_row + c, mask=c < d_in, other=0.0).to(tl.float32)) * tl.load(n_row + c, mask=c < d_in,
                                                                                           other=0.0)
        top = tl.maximum(top, tl.max(tl.where(c < d_in, s.to(tl.int32, bitcast=True), -1), axis=0))
    lo = 0
    hi = top + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        cnt = 0
        for c0 in range(0, d_in, CH):
            c = c0 + cols
            s = tl.abs(tl.load(w_row + c, mask=c < d_in, other=0.0).to(tl.float32)) * tl.load(
                n_row + c, mask=c < d_in, other=0.0)
            b = tl.where(c < d_in, s.to(tl.int32, bitcast=True), -1)
            cnt += tl.sum((b >= mid).to(tl.int32), axis=0)
        if cnt >= k:
            lo = mid
        else:
            hi = mid
    gt = 0
    for c0 in range(0, d_in, CH):
        c = c0 + cols
        s = tl.abs(tl.load(w_row + c, mask=c < d_in, other=0.0).to(tl.float32)) * tl.load(n_row + c, mask=c < d_in,
                                                                                           other=0.0)
        b = tl.where(c < d_in, s.to(tl.int32, bitcast=True), -1)
        gt += tl.sum((b > lo).to(tl.int32), axis=0)
    need = k - gt  # equal scores at the k-th place taken lowest column first
    seen = 0
    for c0 in range(0, d_in, CH):
        c = c0 + cols
        cm = c < d_in
        aw = tl.abs(tl.load(w_row + c, mask=cm, other=0.0).to(tl.float32))
        s = aw * tl.load(n_row + c, mask=cm, other=0.0)
        b = tl.where(cm, s.to(tl.int32, bitcast=True), -1)
        eq = b == lo
        rank = seen + tl.cumsum(eq.to(tl.int32), axis=0)
        seen += tl.sum(eq.to(tl.int32), axis=0)
        z = tl.load(z_row + c, mask=cm, other=0.0)
        sel = ((b > lo) | (eq & (rank <= need))) & (s > aw * z) & cm
        tl.atomic_or(out_row + (c >> 5), 1 << (c & 31), mask=sel, sem="relaxed")


@triton.jit
def _item(item, item_layer_ptr, item_row_ptr, item_vec_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr,
          lay_dout_ptr, lay_din_ptr, lay_k_ptr, n_vec, vec_span, ALIGNED: tl.constexpr, HINT_Z: tl.constexpr):
    """A work item's first row and vector span, and its layer's shape, k and element offsets.

    ``HINT_Z``: also mark the null norms' offset as 16-aligned (the blocks kernel gathers whole
    8-column blocks of them; in the list kernel the hint only cost registers: 78 -> 91)."""
    layer = tl.load(item_layer_ptr + item)
    row0 = tl.load(item_row_ptr + item)
    vfirst = tl.load(item_vec_ptr + item)
    vend = tl.minimum(vfirst + vec_span, n_vec)
    d_in = tl.load(lay_din_ptr + layer)
    w_off = tl.load(lay_w_ptr + layer)
    n_off = tl.load(lay_n_ptr + layer)
    z_off = tl.load(lay_z_ptr + layer)
    if ALIGNED:  # checked by the launcher: every offset and d_in a multiple of 16 elements
        w_off = tl.multiple_of(w_off, 16)
        n_off = tl.multiple_of(n_off, 16)
        d_in = tl.multiple_of(d_in, 16)
        if HINT_Z:
            z_off = tl.multiple_of(z_off, 16)
    return (row0, vfirst, vend, d_in, tl.load(lay_dout_ptr + layer), tl.load(lay_k_ptr + layer), w_off, n_off, z_off,
            tl.load(lay_o_ptr + layer))


@triton.jit
def bound_rows(gmax, k, BOUND_STEPS: tl.constexpr):
    """Per row of ``gmax`` ``[M, CH]`` (strided group maxima of non-negative scores): ``lo`` with
    >= k group maxima >= lo, hence >= k scores >= lo, and the bits of the row's top score.

    Bisection on the float bits (non-negative floats order like their int32 patterns), starting
    8 octaves below the top; rows with fewer than k maxima there start from 0."""
    gb = gmax.to(tl.int32, bitcast=True)
    top = tl.max(gb, axis=1)
    lo = tl.maximum(top - (8 << 23), 0)
    far = tl.sum((gb >= lo[:, None]).to(tl.int32), axis=1) < k
    hi = tl.where(far, tl.maximum(lo, 1), top + 1)
    lo = tl.where(far, 0, lo)
    for _ in tl.static_range(BOUND_STEPS):
        mid = lo + (hi - lo) // 2
        up = tl.sum((gb >= mid[:, None]).to(tl.int32), axis=1) >= k
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid)
    return lo, top


@triton.jit
def _stream_mask_kernel(
    w_ptr, n_ptr, z_ptr, out_ptr, scr_ptr, stats_ptr,
    item_layer_ptr, item_row_ptr, item_vec_ptr,
    lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_dout_ptr, lay_din_ptr, lay_k_ptr,
    n_items, n_vec, n_t, vec_span,
    R: tl.constexpr, V: tl.constexpr, CH: tl.constexpr, CAP: tl.constexpr, BOUND_STEPS: tl.constexpr,
    EVEN: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Persistent grid over work items (R rows x a span of vectors); see the module docstring."""
    M: tl.constexpr = V * R
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, CH)
    rr = tl.arange(0, R)
    mm = tl.arange(0, M)
    m_row = mm % R
    m_vec = mm // R
    slots = tl.arange(0, CAP)
    scr = scr_ptr + pid.to(tl.int64) * (M * CAP) + mm[:, None].to(tl.int64) * CAP  # [M, 1]
    for item in range(pid, n_items, nprog):
        row0, vfirst, vend, d_in, d_out, k, w_off, n_off, z_off, o_off = _item(
            item, item_layer_ptr, item_row_ptr, item_vec_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr,
            lay_dout_ptr, lay_din_ptr, lay_k_ptr, n_vec, vec_span, ALIGNED, False)
        n_words = (d_in + 31) // 32
        rows = row0 + rr
        row_ok = rows < d_out
        w_rows = w_ptr + w_off + rows[:, None].to(tl.int64) * d_in  # [R, 1]
        mrow = row0 + m_row
        w_m = w_ptr + w_off + mrow.to(tl.int64) * d_in  # [M]
        for v0 in range(vfirst, vend, V):
            vecs = v0 + tl.arange(0, V)
            vec_ok = vecs < vend
            n_rows = n_ptr + n_off + vecs[:, None].to(tl.int64) * d_in  # [V, 1]
            mv = v0 + m_vec
            m_ok = (mrow < d_out) & (mv < vend)
            # 1. group maxima over strided groups of columns
            gmax = tl.full([M, CH], -1.0, tl.float32)
            for c0 in range(0, d_in, CH):
                gmax = tl.maximum(gmax, _scores(w_rows, n_rows, c0 + cols, d_in, row_ok, vec_ok, EVEN, R, V, CH))
            # 2. a lower bound reached by >= k group maxima
            lo, top = bound_rows(gmax, k, BOUND_STEPS)
            # 3. every score >= lo into the list, in column order
            cnt = tl.zeros([M], dtype=tl.int32)
            for c0 in range(0, d_in, CH):
                c = c0 + cols
                sb = _scores(w_rows, n_rows, c, d_in, row_ok, vec_ok, EVEN, R, V, CH).to(tl.int32, bitcast=True)
                hit = sb >= lo[:, None]
                pos = cnt[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
                key = (sb.to(tl.int64) << 32) | c[None, :].to(tl.int64)
                tl.store(scr + pos, key, mask=hit & (pos < CAP))
                cnt += tl.sum(hit.to(tl.int32), axis=1)
            tl.debug_barrier()  # the list is written by all threads before anyone reads it
            # 4. exact selection on the list (bisection on bits; ties at the k-th place by column)
            fits = cnt <= CAP
            key = tl.load(scr + slots[None, :], mask=slots[None, :] < tl.minimum(cnt, CAP)[:, None], other=-1)
            bits = (key >> 32).to(tl.int32)
            col = key.to(tl.int32)  # the low word
            c_lo = cnt
            hi = tl.where(fits & (c_lo > k), top + 1, lo + 1)
            while tl.max(hi - lo, axis=0) > 1:
                mid = lo + (hi - lo) // 2
                c_mid = tl.sum((bits >= mid[:, None]).to(tl.int32), axis=1)
                up = (c_mid >= k) & (hi - lo > 1)
                down = (c_mid < k) & (hi - lo > 1)
                lo = tl.where(up, mid, lo)
                c_lo = tl.where(up, c_mid, c_lo)
                hi = tl.where(down, mid, hi)
                hi = tl.where(c_lo == k, lo + 1, hi)
            gt = tl.sum((bits > lo[:, None]).to(tl.int32), axis=1)
            eq = bits == lo[:, None]
            rank = tl.cumsum(eq.to(tl.int32), axis=1)
            sel = (bits > lo[:, None]) | (eq & (rank <= (k - gt)[:, None]))
            sel = sel & (fits & m_ok)[:, None]
            # 5. null comparison on the selected entries, then OR their bits into the mask
            mv64 = mv
            wsel = tl.load(w_m[:, None] + col, mask=sel, other=0.0)
            zsel = tl.load(z_ptr + z_off + mv64[:, None] * d_in + col, mask=sel, other=0.0)
            score = bits.to(tl.float32, bitcast=True)
            sel = sel & (score > tl.abs(wsel.to(tl.float32)) * zsel)
            out_m = out_ptr + o_off + ((mv64 // n_t) * d_out + mrow) * n_words  # [M]
            tl.atomic_or(out_m[:, None] + (col >> 5), 1 << (col & 31), mask=sel, sem="relaxed")
            tl.debug_barrier()  # the list is read by all threads before the next vectors overwrite it
            spill = m_ok & ~fits
            if tl.max(spill.to(tl.int32), axis=0) > 0:  # rare: many equal scores >= the bound
                for i in range(0, M):
                    if tl.max(tl.where(mm == i, spill.to(tl.int32), 0), axis=0) > 0:
                        tl.atomic_add(stats_ptr, 1)
                        r = row0 + i % R
                        v = tl.zeros([], tl.int64) + (v0 + i // R)
                        _stream_exact(w_ptr + w_off + r.to(tl.int64) * d_in, n_ptr + n_off + v * d_in,
                                      z_ptr + z_off + v * d_in, out_ptr + o_off + ((v // n_t) * d_out + r) * n_words,
                                      d_in, k, CH)


@triton.jit
def _kth_bits(bits, lo, top, c_lo, k):
    """Bisection on the float bits of a 2-D tile for one selection problem.

    Given ``c_lo`` = count(bits >= lo) >= k and ``top`` >= every value, returns a ``lo`` with
    count(bits >= lo) >= k that is either reached by exactly k values or is the k-th value itself
    (equal values straddle the k-th place).
    """
    hi = tl.where(c_lo > k, top + 1, lo + 1)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        c_mid = tl.sum(tl.sum((bits >= mid).to(tl.int32), axis=1), axis=0)
        if c_mid >= k:
            lo = mid
            if c_mid == k:
                hi = lo + 1
        else:
            hi = mid
    return lo


@triton.jit
def _pass1_step(w_row, n_row, bmx, c0, cols, bidx, d_in, gmax, EVEN: tl.constexpr, NB: tl.constexpr):
    """One chunk of pass 1: scores, the running strided group maxima, the 8-column block maxima."""
    c = c0 + cols
    if EVEN:
        s = tl.abs(tl.load(w_row + c).to(tl.float32)) * tl.load(n_row + c)
    else:
        s = tl.abs(tl.load(w_row + c, mask=c < d_in, other=0.0).to(tl.float32)) * tl.load(
            n_row + c, mask=c < d_in, other=0.0)
        s = tl.where(c < d_in, s, -1.0)
    tl.store(bmx + c0 // 8 + bidx, tl.max(tl.reshape(s, [NB, 8]), axis=1))
    return tl.maximum(gmax, s)


@triton.jit
def _list_blocks(brow, lst, lo, n_blocks, lanes, CAPB: tl.constexpr, CH: tl.constexpr):
    """Write the indices of the blocks whose maximum (float bits) reaches ``lo`` to ``lst``, in
    column order, up to CAPB of them; returns how many reach it (may exceed CAPB)."""
    nh = 0
    for b0 in range(0, n_blocks, CH):
        b = b0 + lanes
        bb = tl.load(brow + b, mask=b < n_blocks, other=-1.0).to(tl.int32, bitcast=True)
        hit = bb >= lo
        pos = nh + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(lst + pos, b, mask=hit & (pos < CAPB))
        nh += tl.sum(hit.to(tl.int32), axis=0)
    return nh


@triton.jit
def _refine_bound(brow, lo, top, nh, n_blocks, k, lanes, CAPB: tl.constexpr, CH: tl.constexpr):
    """Given ``nh`` = count(block maxima >= lo) > CAPB (and >= k): bisection on the block maxima's
    bits for a bound reached by k to CAPB blocks. Returns ``(lo, count)``; the count stays above
    CAPB when no such bound exists (more than CAPB blocks share the values around the k-th place).

    Invariants: count(>= lo) >= k, so the k-th largest score is still >= lo; count(>= hi) < k.
    """
    hi = top + 1
    while (nh > CAPB) & (hi - lo > 1):
        mid = lo + (hi - lo) // 2
        c = 0
        for b0 in range(0, n_blocks, CH):
            b = b0 + lanes
            bb = tl.load(brow + b, mask=b < n_blocks, other=-1.0).to(tl.int32, bitcast=True)
            c += tl.sum((bb >= mid).to(tl.int32), axis=0)
        if c >= k:
            lo = mid
            nh = c
        else:
            hi = mid
    return lo, nh


@triton.jit
def _blocks_mask_kernel(
    w_ptr, n_ptr, z_ptr, out_ptr, bmx_ptr, lst_ptr, stats_ptr,
    item_layer_ptr, item_row_ptr, item_vec_ptr,
    lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_dout_ptr, lay_din_ptr, lay_k_ptr,
    n_items, n_vec, n_t, vec_span, bmx_stride,
    CH: tl.constexpr, CAPB: tl.constexpr, BOUND_STEPS: tl.constexpr, EVEN: tl.constexpr, ALIGNED: tl.constexpr,
    TWO_LEVEL: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
    PIPE: tl.constexpr, FROM_PASS1: tl.constexpr = False, pre_ptr=None, lay_b_ptr=None, lay_r_ptr=None,
    REFINE: tl.constexpr = False,
):
    """One (row, vector) at a time; pass 2 reads back only the 8-column blocks that can hold a winner.

    Pass 1 streams the row: strided group maxima ``gmax`` (for the bound, as in the list variant)
    and the maximum of every aligned 8-column block, stored to the program's scratch. The blocks
    whose maximum reaches the bound ``lo`` (~k of them) are listed in column order, gathered as a
    ``[CAPB, 8]`` tile (scores recomputed bit-identically), and the exact selection runs on that
    tile; each block lies inside one mask word, so the OR is one atomic per block.
    """
    NB: tl.constexpr = CH // 8
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, CH)
    bidx = tl.arange(0, NB)
    lanes = tl.arange(0, CH)
    slots = tl.arange(0, CAPB)
    j8 = tl.arange(0, 8)
    bmx = bmx_ptr + pid.to(tl.int64) * bmx_stride
    lst = lst_ptr + pid.to(tl.int64) * CAPB
    for item in range(pid, n_items, nprog):
        row, vfirst, vend, d_in, d_out, k, w_off, n_off, z_off, o_off = _item(
            item, item_layer_ptr, item_row_ptr, item_vec_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr,
            lay_dout_ptr, lay_din_ptr, lay_k_ptr, n_vec, vec_span, ALIGNED, True)
        n_words = (d_in + 31) // 32
        n_blocks = (d_in + 7) // 8
        w_row = w_ptr + w_off + row.to(tl.int64) * d_in
        for v32 in range(vfirst, vend):
            v = tl.zeros([], tl.int64) + v32
            n_row = n_ptr + n_off + v * d_in
            if FROM_PASS1:  # pass 1 and the bound ran in mask_split's streaming kernel
                layer = tl.load(item_layer_ptr + item)
                prob = tl.load(lay_r_ptr + layer) + v * d_out + row
                brow = bmx_ptr + tl.load(lay_b_ptr + layer) + (v * d_out + row) * n_blocks
                lo = tl.load(pre_ptr + 2 * prob)
                top = tl.load(pre_ptr + 2 * prob + 1)
            else:
                brow = bmx
                # 1. strided group maxima (the bound) and 8-column block maxima (to scratch)
                gmax = tl.full([CH], -1.0, tl.float32)
                if PREFETCH > 0:
                    # the loads of the next PREFETCH chunks are issued before this chunk's arithmetic,
                    # so a program keeps PREFETCH + 1 memory round trips in flight
                    wv = tl.load(w_row + cols, mask=cols < d_in, other=0.0)
                    nv = tl.load(n_row + cols, mask=cols < d_in, other=0.0)
                    w1 = wv
                    n1 = nv
                    if PREFETCH > 1:
                        w1 = tl.load(w_row + CH + cols, mask=CH + cols < d_in, other=0.0)
                        n1 = tl.load(n_row + CH + cols, mask=CH + cols < d_in, other=0.0)
                    for c0 in range(0, d_in, CH):
                        c = c0 + cols
                        ahead = c + PREFETCH * CH
                        wn = tl.load(w_row + ahead, mask=ahead < d_in, other=0.0)
                        nn = tl.load(n_row + ahead, mask=ahead < d_in, other=0.0)
                        s = tl.abs(wv.to(tl.float32)) * nv
                        if not EVEN:
                            s = tl.where(c < d_in, s, -1.0)
                        gmax = tl.maximum(gmax, s)
                        tl.store(bmx + c0 // 8 + bidx, tl.max(tl.reshape(s, [NB, 8]), axis=1))
                        if PREFETCH > 1:
                            wv = w1
                            nv = n1
                            w1 = wn
                            n1 = nn
                        else:
                            wv = wn
                            nv = nn
                elif PIPE > 1:  # Triton's software pipeliner: async copies PIPE - 1 chunks ahead
                    for c0 in tl.range(0, d_in, CH, num_stages=PIPE):
                        gmax = _pass1_step(w_row, n_row, bmx, c0, cols, bidx, d_in, gmax, EVEN, NB)
                else:
                    for c0 in range(0, d_in, CH):
                        gmax = _pass1_step(w_row, n_row, bmx, c0, cols, bidx, d_in, gmax, EVEN, NB)
            if STAGES < 2:  # timing aid: pass 1 only (keep gmax alive)
                top = tl.max(gmax, axis=0).to(tl.int32, bitcast=True)
                tl.store(lst + tl.arange(0, 1), tl.zeros([1], tl.int32) + top)
            else:
                if not FROM_PASS1:
                    # 2. a lower bound reached by >= k group maxima (start 8 octaves below the top)
                    gb = gmax.to(tl.int32, bitcast=True)
                    top = tl.max(gb, axis=0)
                    lo = tl.maximum(top - (8 << 23), 0)
                    far = tl.sum((gb >= lo).to(tl.int32), axis=0) < k
                    hi = tl.where(far, tl.maximum(lo, 1), top + 1)
                    lo = tl.where(far, 0, lo)
                    for _ in tl.static_range(BOUND_STEPS):
                        mid = lo + (hi - lo) // 2
                        up = tl.sum((gb >= mid).to(tl.int32), axis=0) >= k
                        lo = tl.where(up, mid, lo)
                        hi = tl.where(up, hi, mid)
                tl.debug_barrier()  # block maxima stored by all threads
                # 3. the blocks whose maximum reaches lo, listed in column order. (Triton moves the
                # scattered store's pointers through shared memory, 24 % of the instructions; one
                # block per thread or atomic-exchange writes avoid that but measured slower on the H200)
                nh = _list_blocks(brow, lst, lo, n_blocks, lanes, CAPB, CH)
                tl.debug_barrier()  # the list is written by all threads before anyone reads it
                if REFINE:
                    if nh > CAPB:
                        # more blocks reach lo than the tile holds (a loose bound): raise lo on the
                        # block maxima until the hit list fits, then list again
                        lo, nh = _refine_bound(brow, lo, top, nh, n_blocks, k, lanes, CAPB, CH)
                        if nh <= CAPB:
                            tl.atomic_add(stats_ptr + 1, 1)
                            nh = _list_blocks(brow, lst, lo, n_blocks, lanes, CAPB, CH)
                            tl.debug_barrier()
                if STAGES < 3:  # timing aid: pass 1, the bound and the hit list only
                    tl.store(lst + tl.arange(0, 1), tl.zeros([1], tl.int32) + nh)
                else:
                    fits = nh <= CAPB
                    if fits:
                        # 4. gather the listed blocks; exact selection on the [CAPB, 8] tile
                        blk = tl.load(lst + slots, mask=slots < nh, other=-1)
                        c = blk[:, None] * 8 + j8[None, :]
                        ok = (blk >= 0)[:, None] & (c < d_in)
                        s = tl.abs(tl.load(w_row + c, mask=ok, other=0.0).to(tl.float32)) * tl.load(n_row + c, mask=ok,
                                                                                                    other=0.0)
                        bits = tl.where(ok, s.to(tl.int32, bitcast=True), -1)  # only the bits stay live
                        if TWO_LEVEL:
                            # first the k-th largest block maximum (4 values per lane): at least k scores
                            # reach it, and usually only a few more (blocks holding two of the top k)
                            hb = tl.load(brow + blk, mask=blk >= 0, other=-1.0).to(tl.int32, bitcast=True)
                            lo = _kth_bits(hb[:, None], lo, top, nh, k)
                            # then drop the smallest scores >= lo, one distinct value at a time, while
                            # at least k remain: ends at exactly k, or at the k-th value (a tie)
                            c_lo = tl.sum(tl.sum((bits >= lo).to(tl.int32), axis=1), axis=0)
                            while c_lo > k:
                                low = tl.min(tl.min(tl.where(bits >= lo, bits, 0x7FFFFFFF), axis=1), axis=0)
                                n_low = tl.sum(tl.sum((bits == low).to(tl.int32), axis=1), axis=0)
                                if c_lo - n_low >= k:
                                    lo = low + 1
                                    c_lo = c_lo - n_low
                                else:
                                    lo = low
                                    c_lo = k  # leave: `low` is the k-th value
                        else:
                            lo = _kth_bits(bits, lo, top, tl.sum(tl.sum((bits >= lo).to(tl.int32), axis=1), axis=0), k)
                        gt = tl.sum(tl.sum((bits > lo).to(tl.int32), axis=1), axis=0)
                        sel = bits > lo
                        eq = bits == lo
                        n_eq = tl.sum(tl.sum(eq.to(tl.int32), axis=1), axis=0)
                        if gt + n_eq > k:  # equal scores straddle the k-th place: lowest columns first
                            rank = tl.reshape(tl.cumsum(tl.reshape(eq.to(tl.int32), [CAPB * 8]), axis=0), [CAPB, 8])
                            sel = sel | (eq & (rank <= k - gt))
                        else:
                            sel = sel | eq
                        # 5. null comparison (|W| re-read), one OR per block (a block lies inside one word).
                        # The loads take the gather's mask, uniform over a block, so they stay vector loads
                        # (masking by `sel` made them 64 scalar loads per lane: 18 % of the kernel's stalls)
                        c = blk[:, None] * 8 + j8[None, :]
                        ok = (blk >= 0)[:, None] & (c < d_in)
                        aw = tl.abs(tl.load(w_row + c, mask=ok, other=0.0).to(tl.float32))
                        z = tl.load(z_ptr + z_off + v * d_in + c, mask=ok, other=0.0)
                        sel = sel & (bits.to(tl.float32, bitcast=True) > aw * z)
                        word_bits = tl.sum(tl.where(sel, 1 << (c & 31), 0), axis=1)
                        out_row = out_ptr + o_off + ((v // n_t).to(tl.int64) * d_out + row) * n_words
                        tl.atomic_or(out_row + (blk >> 2), word_bits, mask=word_bits != 0, sem="relaxed")
                    else:  # rare: many equal scores >= the bound (e.g. a zero row)
                        tl.atomic_add(stats_ptr, 1)
                        _stream_exact(w_row, n_row, z_ptr + z_off + v * d_in,
                                      out_ptr + o_off + ((v // n_t).to(tl.int64) * d_out + row) * n_words, d_in, k, CH)
            tl.debug_barrier()  # scratch read by all threads before the next vector overwrites it


#: Register cap of the one-warp blocks kernel (see stream_config).
MAXNREG = 128


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """``variant``: ``"blocks"`` (pass 2 gathers the 8-column blocks that can hold a winner),
    ``"regs"`` (``mask_regs``: the block maxima stay in registers; opt-in, measured slower),
    ``"split"`` (the same selection after a separate multi-warp pass-1 kernel: ``mask_split``) or
    ``"list"`` (pass 2 streams the whole row into a list of every score >= the bound);
    ``"blocks-bisect"`` is ``"blocks"`` with one bisection over the gathered tile instead of two
    levels (block maxima, then dropping the smallest); ``rows`` x
    ``vectors`` selection problems per step (list variant; blocks: 1 x 1); ``chunk`` columns per
    streamed step (also the number of strided bound groups); ``cap`` list slots (list) or gathered
    blocks (blocks) per problem; ``bound_steps`` bisection steps for the bound; ``span`` vectors per
    work item (batched statistics are split so that there are enough items); ``maxnreg`` a
    register cap (0: none); ``prefetch`` (blocks variants): issue the loads of pass 1's next
    ``prefetch`` chunks (0, 1 or 2) before the current chunk's arithmetic; ``stages`` (blocks
    variants; a timing aid, wrong masks below 3): 1 runs pass 1 only, 2 also the bound and the hit
    list, 3 everything; ``pipe`` > 1 (with ``prefetch`` 0): pass 1 through Triton's software
    pipeliner with that many stages (asynchronous copies to shared memory) instead; ``refine``
    (blocks variants): a tile of k + k/8 + 4 blocks, and problems with more candidate blocks raise
    their bound on the block maxima to fit instead of taking the slow path (measured slower on the
    H100, BENCHMARKS.md, so off); ``serial`` (regs variant): each piece of pass 1 waits for the
    previous one (fewer registers in flight)."""

    variant: str
    rows: int
    vectors: int
    chunk: int
    cap: int
    bound_steps: int
    num_warps: int
    span: int
    progs_per_sm: int
    maxnreg: int = 0
    prefetch: int = 0
    stages: int = 3
    pipe: int = 0
    refine: int = 0
    serial: int = 0


def stream_config(d_ins: Sequence[int], ks: Sequence[int], n_vec: int, n_rows: int,
                  device: torch.device) -> StreamConfig:
    """The heuristic (one warp per program, one row per step; H200 sweep in BENCHMARKS.md); every
    field can be forced with ``_config.stream_overrides``."""
    k_max = max(ks)
    forced = _config.stream_forced()
    variant = str(forced.get("variant", "blocks"))
    # >= k strided groups per row keep the bound valid (k <= 128 here: stream_eligible)
    chunk = int(forced.get("chunk", max(_config.pow2_ceil(k_max), 256 if min(d_ins) >= 256 else 128)))
    # tile rows (blocks) / list slots: 2k + 8, so that overflows (slow path) are rare; with `refine`
    # (blocks variants) k + k/8 + 4, and a problem with more candidate blocks raises its bound to fit
    refine = int(forced.get("refine", 0)) if variant != "list" else 0
    margin = k_max // 8 + 4 if refine else k_max + 8
    cap = int(forced.get("cap", max(32, _config.pow2_ceil(k_max + margin))))
    rows = 1 if variant != "list" else int(forced.get("rows", 1))
    vectors = 1 if variant != "list" else int(forced.get("vectors", 1))
    num_warps = int(forced.get("num_warps", 1))
    progs_per_sm = int(forced.get("progs_per_sm", 32 // num_warps))
    slots = progs_per_sm * _config.num_sms(device)
    tasks = -(-n_rows // rows)
    # split the vectors into spans (whole tiles of `vectors`) until there are ~4 items per program
    tiles = -(-n_vec // vectors)
    pieces = max(1, min(tiles, -(-4 * slots // tasks)))
    span = int(forced.get("span", vectors * -(-tiles // pieces)))
    # the blocks variant compiles to ~210 registers (the gathered tile's loads in flight); capping
    # at 128 doubles the programs per SM without spilling (H200 sweep: 218 -> 143 us, BENCHMARKS.md)
    maxnreg = int(forced.get("maxnreg", MAXNREG if variant in ("blocks", "split", "regs") and num_warps == 1 else 0))
    # pass 1 through Triton's pipeliner, 4 stages (3 chunks of async copies in flight): 803.7 ->
    # 753.1 us SDXL, 119.9 -> 119.3 us SD1.5 against prefetching one chunk by hand in registers
    # (which beat no prefetch by 2 %; BENCHMARKS.md)
    pipe = int(forced.get("pipe", 4))
    prefetch = int(forced.get("prefetch", 0 if pipe > 1 else 1))
    return StreamConfig(variant, rows, vectors, chunk, cap, int(forced.get("bound_steps", 10)), num_warps, span,
                        progs_per_sm, maxnreg, prefetch, int(forced.get("stages", 3)), pipe, refine,
                        int(forced.get("serial", 0)))


def stream_eligible(ks: Sequence[int]) -> bool:
    """Whether the streaming kernel suits these layers: its list holds ~2k entries, so large k
    (sparsity far above the paper's 1%) goes to the tile kernel's dense path instead."""
    return max(ks) <= 128


_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _item_tables(heights, d_ins, n_vec, cfg: StreamConfig, device):
    """item -> (layer, first row, first vector), widest rows first."""
    key = (tuple(heights), tuple(d_ins), n_vec, cfg, str(device))
    if key not in _TABLES:
        order = sorted(range(len(heights)), key=lambda i: -d_ins[i])
        lay, row, vec = [], [], []
        for i in order:
            for r in range(0, heights[i], cfg.rows):
                for v in range(0, n_vec, cfg.span):
                    lay.append(i)
                    row.append(r)
                    vec.append(v)
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = tuple(torch.tensor(x, dtype=torch.int32).to(device) for x in (lay, row, vec))
    return _TABLES[key]


def launch_stream(weights, roots: torch.Tensor, n_starts: Sequence[int], z_starts: Sequence[int], ks: Sequence[int],
                  outs, n_vec: int, n_t: int, stats: torch.Tensor | None = None) -> None:
    """One launch for layers of one weight dtype (any widths); ``roots`` holds every norm row.

    ``n_starts[i]`` / ``z_starts[i]``: element offsets in ``roots`` of layer i's ``[S * T, d_in]``
    norms and null norms; ``outs[i]``: ``[S, d_out, ceil(d_in / 32)]`` int32, OR-ed in place.
    ``stats`` (int32 ``[2]``) counts the problems that took the slow exact path (``stats[0]``) and
    those whose bound was raised to fit the tile (``stats[1]``, blocks variants); default: the
    device's counters (:func:`slow_path_counter`, :func:`refined_counter`).
    """
    device = weights[0].device
    heights = [w.shape[0] for w in weights]
    d_ins = [w.shape[1] for w in weights]
    cfg = stream_config(d_ins, ks, n_vec, sum(heights), device)
    if stats is None:
        stats = _counters(device)
    if stats.numel() < 2 or stats.dtype != torch.int32:
        raise ValueError(f"stats must be int32 with 2 elements, got {stats.dtype} with {stats.numel()}")
    if cfg.variant == "regs":
        from . import mask_regs  # imported here: it imports this module

        rest = mask_regs.launch_regs(weights, roots, n_starts, z_starts, ks, outs, n_vec, n_t, stats, cfg)
        if rest:  # layers the regs kernel does not take: the blocks kernel
            pick = lambda xs: [xs[i] for i in rest]  # noqa: E731
            with _config.stream_overrides(variant="blocks"):
                launch_stream(pick(weights), roots, pick(n_starts), pick(z_starts), pick(ks), pick(outs), n_vec, n_t,
                              stats)
        return
    if cfg.variant == "split":
        from . import mask_split  # imported here: it imports this module

        mask_split.launch_split(weights, roots, n_starts, z_starts, ks, outs, n_vec, n_t, stats, stream_config)
        return
    w_base, w_offs = _config.element_offsets(weights)
    o_base, o_offs = _config.element_offsets(outs)
    lay, row, vec = _item_tables(heights, d_ins, n_vec, cfg, device)
    n_items = lay.numel()
    key = (cfg, w_base.dtype, str(device))
    per_sm = _OCCUPANCY.get(key, cfg.progs_per_sm)
    nprog = max(1, min(n_items, per_sm * _config.num_sms(device)))
    tab = lambda vals, dt: _config.device_table(tuple(vals), dt, device)
    aligned = all(x % 16 == 0 for x in (*w_offs, *n_starts, *z_starts, *d_ins))
    tables = (lay, row, vec, tab(w_offs, torch.int64), tab(n_starts, torch.int64), tab(z_starts, torch.int64),
              tab(o_offs, torch.int64), tab(heights, torch.int32), tab(d_ins, torch.int32), tab(ks, torch.int32))
    even = all(d % cfg.chunk == 0 for d in d_ins)
    regs_cap = {"maxnreg": cfg.maxnreg} if cfg.maxnreg and not _config.interpreting() else {}
    if cfg.variant in ("blocks", "blocks-bisect"):
        bmx_stride = -(-max(d_ins) // cfg.chunk) * cfg.chunk // 8
        bmx = torch.empty(nprog * bmx_stride, dtype=torch.float32, device=device)
        lst = torch.empty(nprog * cfg.cap, dtype=torch.int32, device=device)
        compiled = _blocks_mask_kernel[(nprog,)](
            w_base, roots, roots, o_base, bmx, lst, stats, *tables, n_items, n_vec, n_t, cfg.span, bmx_stride,
            CH=cfg.chunk, CAPB=cfg.cap, BOUND_STEPS=cfg.bound_steps, EVEN=even, ALIGNED=aligned,
            TWO_LEVEL=cfg.variant == "blocks", PREFETCH=cfg.prefetch, STAGES=cfg.stages, PIPE=cfg.pipe,
            REFINE=bool(cfg.refine), num_warps=cfg.num_warps,
            **regs_cap,
        )
    else:
        scratch = torch.empty(nprog * cfg.rows * cfg.vectors * cfg.cap, dtype=torch.int64, device=device)
        compiled = _stream_mask_kernel[(nprog,)](
            w_base, roots, roots, o_base, scratch, stats, *tables, n_items, n_vec, n_t, cfg.span,
            R=cfg.rows, V=cfg.vectors, CH=cfg.chunk, CAP=cfg.cap, BOUND_STEPS=cfg.bound_steps,
            EVEN=even, ALIGNED=aligned, num_warps=cfg.num_warps, **regs_cap,
        )
    regs = getattr(compiled, "n_regs", 0)
    if device.type == "cuda" and regs and key not in _OCCUPANCY and "progs_per_sm" not in _config.stream_forced():
        # as many programs per SM as registers allow, at most 32 blocks and 64 warps
        _OCCUPANCY[key] = max(1, min(65536 // (regs * 32 * cfg.num_warps), 32, 64 // cfg.num_warps))


_OCCUPANCY: dict[tuple, int] = {}


def _counters(device: torch.device) -> torch.Tensor:
    """int32 ``[2]`` on ``device``: [slow exact path, bound raised to fit the tile] problem counts."""
    return device_counters("triton.mask_stream", 2, device)


def slow_path_counter(device: torch.device) -> torch.Tensor:
    """int32 ``[1]`` on ``device`` (a view): how many (row, vector) problems took the slow exact path
    so far (all launches that were not given their own ``stats``; benchmarks read and reset it)."""
    return _counters(device)[:1]


def refined_counter(device: torch.device) -> torch.Tensor:
    """int32 ``[1]`` on ``device`` (a view): how many problems of the blocks kernels had more
    candidate blocks than the tile holds and were decided after raising the bound instead."""
    return _counters(device)[1:]
