"""memorized_mask, "regs" variant: one warp per (row, vector), the row's 8-column block maxima in registers.

Opt-in (``stream_overrides(variant="regs")``): measured slower than the default blocks kernel on an
H100 (2026-12-06, commit 1cceae4, SD1.5; BENCHMARKS.md, fifth session): one vector 133.0 us at a
168-register cap (182.8 at 128, where Triton 3.6 spills 472 bytes; 181.0 uncapped at 206
registers; 141.0 with ``serial``) against 123.6 us, batched 103.7 us per vector at best against
95.7. The same design in CUDA (``csrc/cuda/mask_warp.cu``) runs in 79.1 / 38.5 us: Triton 3.6
emits about twice its instructions here (5,440 SASS instructions for 20 chunks against ~2,300)
and hoists every piece's loads, which is what ``serial`` undoes.

The design of the CUDA warp kernel (``csrc/cuda/mask_warp.cu``) in Triton. Lane l owns the
8-column block ``32 i + l`` of every 256-column chunk i. Pass 1 keeps the block maxima in
registers as pieces of 4 chunks (``[4, 32]`` tensors: 4 values per lane) plus a tail of 1 or 2
chunks, so that no register tensor is padded to a power of two (d_in 5120 = 5 pieces of 4 chunks;
2560 = 2 + a tail of 2; 1280 = 1 + a tail of 1). Every count is a lane-local sum over the pieces
and one warp reduction. Then, as in the blocks kernel (``mask_stream``) but without its global
scratch of block maxima:

  1. bound: bisection on the block maxima's bits until k to CAP of them reach ``lo`` (every top-k
     score lies in such a block);
  2. those blocks are listed (a per-lane count, one warp scan, lane-local positions) to the
     program's scratch and gathered as a ``[CAP / 32, 32, 8]`` tile, scores recomputed with the
     same operations (bit-identical);
  3. lo is raised to the k-th largest listed block maximum, then the smallest scores >= lo are
     dropped one distinct value at a time while more than k remain;
  4. the k left get the null comparison and one ``atomic_or`` per block.

A problem it cannot decide (equal scores straddling the k-th place, more than CAP blocks around
it, fewer than k non-negative block maxima) takes ``mask_stream._stream_exact`` in the same program
(counted in ``stats[0]``). Layers must have d_in a multiple of 16 (at most 8192) and offsets that
are multiples of 16 elements; the launcher sends other layers to the blocks kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .mask_stream import _item, _stream_exact

#: Listed blocks at most (4 per lane).
CAP = 128
INT_MAX = tl.constexpr(0x7FFFFFFF)


def chunks_for(d_in: int) -> int:
    """256-column chunks per row, rounded up to a compiled size (0: the kernel does not take it)."""
    need = -(-d_in // 256)
    return next((nc for nc in (5, 10, 20, 32) if need <= nc), 0)


def eligible(d_in: int, k: int) -> bool:
    return d_in % 8 == 0 and chunks_for(d_in) > 0 and k <= CAP - 32 and k <= d_in // 8


@triton.jit
def _piece(w_row, n_row, c0, n_blocks, prev, NCH: tl.constexpr, SERIAL: tl.constexpr):
    """Block maxima (int32 score bits; -1 past the row) of chunks c0 .. c0 + NCH - 1 as ``[NCH, 32]``.

    ``SERIAL``: the loads wait for the previous piece ``prev`` (its top bits can never be -2, a
    negative NaN, so the clamp below never moves), which keeps one piece's loads in flight at a
    time instead of all of them (fewer registers)."""
    i = tl.arange(0, NCH)[:, None]
    lane = tl.arange(0, 32)[None, :]
    b = (c0 + i) * 32 + lane  # [NCH, 32]
    last = n_blocks - 1
    if SERIAL:
        last = last - (tl.max(tl.max(prev, axis=0), axis=0) == -2).to(tl.int32)
    bc = tl.minimum(b, last)  # loads clamped to a real block: no masks
    col = bc[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    s = tl.abs(tl.load(w_row + col).to(tl.float32)) * tl.load(n_row + col)
    m = tl.max(s.to(tl.int32, bitcast=True), axis=2)
    return tl.where(b < n_blocks, m, -1)


@triton.jit
def _ge(x, t):
    """Per lane: how many of the piece's values (axis 0) are >= t."""
    return tl.sum((x >= t).to(tl.int32), axis=0)


@triton.jit
def _count(p0, p1, p2, p3, p4, p5, p6, p7, pt, t, P4: tl.constexpr, TAIL: tl.constexpr):
    """How many block maxima of the row (pieces p0..p{P4-1} and the tail) are >= t."""
    return tl.sum(_count_lanes(p0, p1, p2, p3, p4, p5, p6, p7, pt, t, P4, TAIL), axis=0)


@triton.jit
def _count_lanes(p0, p1, p2, p3, p4, p5, p6, p7, pt, t, P4: tl.constexpr, TAIL: tl.constexpr):
    """Per lane ``[32]``: how many of its block maxima are >= t."""
    c = _ge(p0, t)
    if P4 > 1:
        c += _ge(p1, t)
    if P4 > 2:
        c += _ge(p2, t)
    if P4 > 3:
        c += _ge(p3, t)
    if P4 > 4:
        c += _ge(p4, t)
    if P4 > 5:
        c += _ge(p5, t)
    if P4 > 6:
        c += _ge(p6, t)
    if P4 > 7:
        c += _ge(p7, t)
    if TAIL > 0:
        c += _ge(pt, t)
    return c


@triton.jit
def _lane_max(p0, p1, p2, p3, p4, p5, p6, p7, pt, P4: tl.constexpr, TAIL: tl.constexpr):
    m = tl.max(p0, axis=0)
    if P4 > 1:
        m = tl.maximum(m, tl.max(p1, axis=0))
    if P4 > 2:
        m = tl.maximum(m, tl.max(p2, axis=0))
    if P4 > 3:
        m = tl.maximum(m, tl.max(p3, axis=0))
    if P4 > 4:
        m = tl.maximum(m, tl.max(p4, axis=0))
    if P4 > 5:
        m = tl.maximum(m, tl.max(p5, axis=0))
    if P4 > 6:
        m = tl.maximum(m, tl.max(p6, axis=0))
    if P4 > 7:
        m = tl.maximum(m, tl.max(p7, axis=0))
    if TAIL > 0:
        m = tl.maximum(m, tl.max(pt, axis=0))
    return tl.max(m, axis=0)


@triton.jit
def _list_piece(lst, p, c0, lo, base, NCH: tl.constexpr):
    """Store the indices of the piece's blocks (chunks c0 ..) whose maximum reaches lo at lane-local
    positions ``base`` + (rank within the lane); returns the new per-lane base."""
    b = (c0 + tl.arange(0, NCH)[:, None]) * 32 + tl.arange(0, 32)[None, :]
    hit = p >= lo
    pos = base[None, :] + tl.cumsum(hit.to(tl.int32), axis=0) - 1
    tl.store(lst + pos, b, mask=hit)
    return base + tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def _regs_mask_kernel(
    w_ptr, n_ptr, z_ptr, out_ptr, lst_ptr, stats_ptr,
    item_layer_ptr, item_row_ptr, item_vec_ptr,
    lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_dout_ptr, lay_din_ptr, lay_k_ptr,
    n_items, n_vec, n_t, vec_span,
    P4: tl.constexpr, TAIL: tl.constexpr, CAPQ: tl.constexpr, CH: tl.constexpr, SERIAL: tl.constexpr = False,
):
    """Persistent grid over work items (one row x a span of vectors); see the module docstring."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lst = lst_ptr + pid.to(tl.int64) * (CAPQ * 32)
    slots = tl.arange(0, CAPQ)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [CAPQ, 32]
    j8 = tl.arange(0, 8)[None, None, :]
    for item in range(pid, n_items, nprog):
        row, vfirst, vend, d_in, d_out, k, w_off, n_off, z_off, o_off = _item(
            item, item_layer_ptr, item_row_ptr, item_vec_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr,
            lay_dout_ptr, lay_din_ptr, lay_k_ptr, n_vec, vec_span, True, True)
        n_words = (d_in + 31) // 32
        n_blocks = d_in // 8
        w_row = w_ptr + w_off + row.to(tl.int64) * d_in
        for v32 in range(vfirst, vend):
            v = tl.zeros([], tl.int64) + v32
            n_row = n_ptr + n_off + v * d_in
            z_row = z_ptr + z_off + v * d_in
            out_row = out_ptr + o_off + ((v // n_t).to(tl.int64) * d_out + row) * n_words
            # 1. block maxima, in pieces of 4 chunks and a tail (unused pieces alias p0)
            p0 = _piece(w_row, n_row, 0, n_blocks, 0, 4, False)
            p1 = p0
            p2 = p0
            p3 = p0
            p4 = p0
            p5 = p0
            p6 = p0
            p7 = p0
            if P4 > 1:
                p1 = _piece(w_row, n_row, 4, n_blocks, p0, 4, SERIAL)
            if P4 > 2:
                p2 = _piece(w_row, n_row, 8, n_blocks, p1, 4, SERIAL)
            if P4 > 3:
                p3 = _piece(w_row, n_row, 12, n_blocks, p2, 4, SERIAL)
            if P4 > 4:
                p4 = _piece(w_row, n_row, 16, n_blocks, p3, 4, SERIAL)
            if P4 > 5:
                p5 = _piece(w_row, n_row, 20, n_blocks, p4, 4, SERIAL)
            if P4 > 6:
                p6 = _piece(w_row, n_row, 24, n_blocks, p5, 4, SERIAL)
            if P4 > 7:
                p7 = _piece(w_row, n_row, 28, n_blocks, p6, 4, SERIAL)
            pt = p0
            if TAIL > 0:
                pt = _piece(w_row, n_row, 4 * P4, n_blocks, p0, TAIL, False)
            # 2. a bound lo reached by k to CAP block maxima (start 8 octaves below the top)
            top = _lane_max(p0, p1, p2, p3, p4, p5, p6, p7, pt, P4, TAIL)
            lo = tl.maximum(top - (8 << 23), 0)
            hi = top.to(tl.int64) + 1  # count(>= hi) < k (NaN bits are INT_MAX)
            c_lo = _count(p0, p1, p2, p3, p4, p5, p6, p7, pt, lo, P4, TAIL)
            if c_lo < k:
                hi = tl.maximum(lo, 1).to(tl.int64)
                lo = 0
                c_lo = _count(p0, p1, p2, p3, p4, p5, p6, p7, pt, 0, P4, TAIL)
            fast = c_lo >= k
            while fast & (c_lo > CAPQ * 32) & (hi - lo > 1):
                mid = (lo + (hi - lo) // 2).to(tl.int32)
                c = _count(p0, p1, p2, p3, p4, p5, p6, p7, pt, mid, P4, TAIL)
                if c >= k:
                    lo = mid
                    c_lo = c
                else:
                    hi = mid.to(tl.int64)
            fast = fast & (c_lo <= CAPQ * 32)
            done = tl.zeros([], tl.int32)
            if fast:
                # 3. list the blocks reaching lo: lane-local positions after a warp scan of the counts
                per_lane = _count_lanes(p0, p1, p2, p3, p4, p5, p6, p7, pt, lo, P4, TAIL)
                base = tl.cumsum(per_lane, axis=0) - per_lane
                base = _list_piece(lst, p0, 0, lo, base, 4)
                if P4 > 1:
                    base = _list_piece(lst, p1, 4, lo, base, 4)
                if P4 > 2:
                    base = _list_piece(lst, p2, 8, lo, base, 4)
                if P4 > 3:
                    base = _list_piece(lst, p3, 12, lo, base, 4)
                if P4 > 4:
                    base = _list_piece(lst, p4, 16, lo, base, 4)
                if P4 > 5:
                    base = _list_piece(lst, p5, 20, lo, base, 4)
                if P4 > 6:
                    base = _list_piece(lst, p6, 24, lo, base, 4)
                if P4 > 7:
                    base = _list_piece(lst, p7, 28, lo, base, 4)
                if TAIL > 0:
                    base = _list_piece(lst, pt, 4 * P4, lo, base, TAIL)
                tl.debug_barrier()  # the list is written by all lanes before anyone reads it
                n_listed = c_lo
                blk = tl.load(lst + slots, mask=slots < n_listed, other=-1)  # [CAPQ, 32]
                col = tl.maximum(blk, 0)[:, :, None] * 8 + j8
                s = tl.abs(tl.load(w_row + col).to(tl.float32)) * tl.load(n_row + col)
                sc = tl.where((blk >= 0)[:, :, None], s.to(tl.int32, bitcast=True), -1)  # [CAPQ, 32, 8]
                bmx = tl.max(sc, axis=2)
                tl.debug_barrier()  # the list is read before the next vector rewrites it
                # 4a. lo = the k-th largest listed block maximum
                while (c_lo > k) & (hi - lo > 1):
                    mid = (lo + (hi - lo) // 2).to(tl.int32)
                    c = tl.sum(tl.sum((bmx >= mid).to(tl.int32), axis=0), axis=0)
                    if c >= k:
                        lo = mid
                        c_lo = c
                    else:
                        hi = mid.to(tl.int64)
                if c_lo == k:  # exactly k blocks reach lo: raise it to the least of their maxima
                    lo = tl.min(tl.min(tl.where(bmx >= lo, bmx, INT_MAX), axis=0), axis=0)
                # 4b. drop the smallest scores >= lo while more than k remain
                c_s = tl.sum(tl.sum(tl.sum((sc >= lo).to(tl.int32), axis=2), axis=0), axis=0)
                tie = tl.zeros([], tl.int32)
                while c_s > k:
                    low = tl.min(tl.min(tl.min(tl.where(sc >= lo, sc, INT_MAX), axis=2), axis=0), axis=0)
                    n_low = tl.sum(tl.sum(tl.sum((sc == low).to(tl.int32), axis=2), axis=0), axis=0)
                    if c_s - n_low >= k:
                        lo = low + 1
                        c_s = c_s - n_low
                    else:
                        tie = tl.full([], 1, tl.int32)  # equal scores straddle the k-th place:
                        c_s = k  # leave; the exact path orders them by column
                if tie == 0:
                    # 5. the k scores >= lo: null comparison, then one OR per block
                    ok = (blk >= 0)[:, :, None]
                    aw = tl.abs(tl.load(w_row + col).to(tl.float32))
                    z = tl.load(z_row + col)
                    sel = ok & (sc >= lo) & (sc.to(tl.float32, bitcast=True) > aw * z)
                    word_bits = tl.sum(tl.where(sel, 1 << ((blk[:, :, None] & 3) * 8 + j8), 0), axis=2)
                    tl.atomic_or(out_row + (blk >> 2), word_bits, mask=word_bits != 0, sem="relaxed")
                    done = tl.full([], 1, tl.int32)
            if done == 0:
                tl.atomic_add(stats_ptr, 1)
                _stream_exact(w_row, n_row, z_row, out_row, d_in, k, CH)


def launch_regs(weights, roots, n_starts, z_starts, ks, outs, n_vec: int, n_t: int, stats, cfg) -> list[int]:
    """Launch the regs kernel for the layers it takes (one launch per chunk class, widest first);
    returns the indices of the layers it left for the caller (d_in not a multiple of 16 or above
    8192, k above 96 or d_in / 8, offsets not multiples of 16 elements)."""
    import torch

    from . import _config
    from .mask_stream import _OCCUPANCY, _item_tables

    device = weights[0].device
    groups: dict[int, list[int]] = {}
    rest = []
    for i, w in enumerate(weights):
        d_in = w.shape[1]
        # the kernel passes ALIGNED hints (offsets and d_in multiples of 16 elements) to _item
        ok = eligible(d_in, ks[i]) and d_in % 16 == 0 and n_starts[i] % 16 == 0 and z_starts[i] % 16 == 0 and (
            w.data_ptr() % 16 == 0)
        if ok:
            groups.setdefault(chunks_for(d_in), []).append(i)
        else:
            rest.append(i)
    for nc in sorted(groups, reverse=True):
        idx = groups[nc]
        ws = [weights[i] for i in idx]
        heights = [w.shape[0] for w in ws]
        d_ins = [w.shape[1] for w in ws]
        w_base, w_offs = _config.element_offsets(ws)
        o_base, o_offs = _config.element_offsets([outs[i] for i in idx])
        if any(x % 16 for x in w_offs):
            rest.extend(idx)
            continue
        lay, row, vec = _item_tables(heights, d_ins, n_vec, cfg, device)
        n_items = lay.numel()
        key = ("regs", nc, cfg, w_base.dtype, str(device))
        per_sm = _OCCUPANCY.get(key, cfg.progs_per_sm)
        nprog = max(1, min(n_items, per_sm * _config.num_sms(device)))
        tab = lambda vals, dt: _config.device_table(tuple(vals), dt, device)  # noqa: E731
        tables = (lay, row, vec, tab(w_offs, torch.int64), tab([n_starts[i] for i in idx], torch.int64),
                  tab([z_starts[i] for i in idx], torch.int64), tab(o_offs, torch.int64),
                  tab(heights, torch.int32), tab(d_ins, torch.int32), tab([ks[i] for i in idx], torch.int32))
        lst = torch.empty(nprog * CAP, dtype=torch.int32, device=device)
        regs_cap = {"maxnreg": cfg.maxnreg} if cfg.maxnreg and not _config.interpreting() else {}
        compiled = _regs_mask_kernel[(nprog,)](
            w_base, roots, roots, o_base, lst, stats, *tables, n_items, n_vec, n_t, cfg.span,
            P4=nc // 4, TAIL=nc % 4, CAPQ=CAP // 32, CH=256, SERIAL=bool(cfg.serial), num_warps=1, **regs_cap,
        )
        regs = getattr(compiled, "n_regs", 0)
        if device.type == "cuda" and regs and key not in _OCCUPANCY and "progs_per_sm" not in _config.stream_forced():
            _OCCUPANCY[key] = max(1, min(65536 // (regs * 32), 32))
    return sorted(rest)
