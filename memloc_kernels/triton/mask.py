"""memorized_mask: score, exact row top-k, null comparison and OR into packed words in one kernel."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..reference import feature_norms
from . import _config, mask_stream

# How a program finds a row's k-th largest score without writing the score matrix to memory.
# The row lives in registers as a tile [R, NT, VEC]: column (r * NT + t) * VEC + j sits in thread
# t, so most steps are in-register and only a few cross threads.
#   1. scores = |W| * sqrt(sumsq) (the |W| row stays in registers for all S x T vectors);
#   2. a lower bound L from the bound groups (SA per thread in the power-of-two block, one in the
#      remainder block; >= k groups in all): 2 rounds of 8 thresholds, counted in 9-bit fields of
#      one int64 so a round is one reduction, give the largest threshold that >= k group maxima
#      reach; then count(score >= L) >= k, and typically ~1.3 k scores reach it. The bucket
#      arithmetic is in float, so L is verified in step 4 (the dense path takes over if it fails);
#   3. candidate groups (VEC adjacent columns whose max >= L) get slots from an in-thread cumsum
#      plus one cross-thread exclusive scan, and (score bits, column) records go to a small
#      per-program scratch buffer, one vector store per group;
#   4. for a chunk of TB vectors at once, with one vector per warp, a bisection on the float bits
#      of the candidates (scores are >= 0, so their int32 patterns order like the floats) stops
#      as soon as exactly k candidates are >= its lower end: those are the row's top k;
#   5. the null comparison is done for the selected candidates only (gathering |W| and the null
#      norm), and their bits are OR-ed into the packed mask with atomic_or: OR is order-free, so
#      the result is deterministic, and the union over timesteps needs no register state (a
#      dense bit tile per row would cost registers that hold |W|).
# Vectors whose candidates overflow the buffer, or whose k-th value is tied (slots are not in
# column order, and ties go to the lower column), and every vector when k is large, take an
# exact dense path: full-row bisection on the bits, a cumsum over equal scores in column order,
# a dense null test, and the words packed and OR-ed. With MaskConfig.fallback == "deferred" that
# path runs in _dense_fallback_kernel over (row, vector) flags instead: compiled into the main
# kernel it sets the whole kernel's register count (~250 vs ~155 for a single vector), and with it
# how few programs fit on an SM (docs/TRITON_MASK_NOTES.md).
#
# Instructions per row element and vector (from the compiled SASS for sm_90, 5120-wide rows,
# 4 warps, 40 elements per thread): about 25 with 8 vectors per chunk, about 29 for a single
# vector, against ~16 that the batched target (25 us per vector for SD1.5) allows at full issue
# rate. Measured times: benchmarks/bench_gpu_ops.py.


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _or_words(out_row, sel, first_word, n_words, P: tl.constexpr):
    """OR the bools ``sel`` ``[P]`` (P a multiple of 32, starting at word ``first_word``) into ``out_row``."""
    bits = tl.reshape(sel.to(tl.int32), [P // 32, 32]) << tl.arange(0, 32)[None, :]
    words = tl.reduce(bits, 1, _bit_or)
    j = first_word + tl.arange(0, P // 32)
    tl.atomic_or(out_row + j, words, mask=(j < n_words) & (words != 0), sem="relaxed")


@triton.jit
def _load_cols(ptr, cols, lim, other, EVEN: tl.constexpr):
    """``ptr[cols]`` for columns below ``lim``, else ``other`` (no mask at all when ``EVEN``)."""
    if EVEN:
        return tl.load(ptr + cols)
    else:
        return tl.load(ptr + cols, mask=cols < lim, other=other)


@triton.jit
def _abs_row(raw, cols, d_in, EVEN: tl.constexpr):
    """|W| in float32, -1 on padding columns (whose norms load as 1, so padded scores are -1)."""
    if EVEN:
        return tl.abs(raw.to(tl.float32))
    else:
        return tl.where(cols < d_in, tl.abs(raw.to(tl.float32)), -1.0)


@triton.jit
def _dense_select(sca, scb, absa, absb, z_row, out_row, ca, cb, d_in, n_words, k,
                  PA: tl.constexpr, PB: tl.constexpr):
    """Exact top-k of one whole row given as 1-D tiles in column order; null test; OR into ``out_row``."""
    ia = sca.to(tl.int32, bitcast=True)
    hi_f = tl.max(sca, axis=0)
    if PB > 0:
        ib = scb.to(tl.int32, bitcast=True)
        hi_f = tl.maximum(hi_f, tl.max(scb, axis=0))
    # invariant: count(bits >= lo) >= k (every real column scores >= 0), count(bits >= hi) < k
    lo = 0
    hi = hi_f.to(tl.int32, bitcast=True) + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        c = tl.sum((ia >= mid).to(tl.int32), axis=0)
        if PB > 0:
            c += tl.sum((ib >= mid).to(tl.int32), axis=0)
        if c >= k:
            lo = mid
        else:
            hi = mid
    gt = tl.sum((ia > lo).to(tl.int32), axis=0)
    if PB > 0:
        gt += tl.sum((ib > lo).to(tl.int32), axis=0)
    need = k - gt
    eqa = ia == lo
    ranka = tl.cumsum(eqa.to(tl.int32), axis=0)
    za = tl.load(z_row + ca, mask=ca < d_in, other=0.0)
    sela = ((ia > lo) | (eqa & (ranka <= need))) & (sca > absa * za)
    _or_words(out_row, sela, 0, n_words, PA)
    if PB > 0:
        eqb = ib == lo
        rankb = tl.cumsum(eqb.to(tl.int32), axis=0) + tl.sum(eqa.to(tl.int32), axis=0)
        zb = tl.load(z_row + cb, mask=cb < d_in, other=0.0)
        selb = ((ib > lo) | (eqb & (rankb <= need))) & (scb > absb * zb)
        _or_words(out_row, selb, PA // 32, n_words, PB)


@triton.jit
def _dense_vector(absa, absb, n_row, z_row, out_row, ca, cb, d_in, n_words, k,
                  PA: tl.constexpr, PB: tl.constexpr, PBW: tl.constexpr):
    """The exact dense path for one vector: the [R, NT, VEC] tiles flattened to column order."""
    fa = tl.reshape(absa, [PA])
    fca = tl.reshape(ca, [PA])
    sca = fa * tl.load(n_row + fca, mask=fca < d_in, other=1.0)
    fb = fa
    fcb = fca
    scb = sca
    if PB > 0:
        fb = tl.reshape(absb, [PBW])
        fcb = tl.reshape(cb, [PBW])
        scb = fb * tl.load(n_row + fcb, mask=fcb < d_in, other=1.0)
    _dense_select(sca, scb, fa, fb, z_row, out_row, fca, fcb, d_in, n_words, k, PA, PB)


@triton.jit
def _count(x):
    """Per-vector counts of a ``[NCH, TB, QW]`` bool tile -> ``[TB]`` (in-thread sum over the chunks
    first, then one warp reduction per vector)."""
    return tl.sum(tl.sum(x.to(tl.int32), axis=0), axis=1)


@triton.jit
def _onehot7(b):
    """int64 with a 1 in 9-bit field ``b - 1`` for buckets ``b`` in 1..7, else 0 (bucket 0 and
    below need no counter: the current bound is known to be reached by >= k)."""
    field = (9 * (tl.minimum(tl.maximum(b, 1), 7) - 1)).to(tl.int64)
    return tl.where(b >= 1, tl.full(b.shape, 1, tl.int64) << field, 0)


@triton.jit
def _best7(s, k):
    """Largest j in 0..7 whose suffix count (buckets >= j, from the packed sums ``s``) is >= k.

    Suffix counts fall as j grows, so the j that qualify are 1..best: their number is ``best``.
    """
    best = tl.zeros(s.shape, dtype=tl.int32)
    suffix = tl.zeros(s.shape, dtype=tl.int64)
    for j in tl.static_range(7, 0, -1):
        suffix += (s >> (9 * (j - 1))) & 511
        best += (suffix >= k).to(tl.int32)
    return best


@triton.jit
def _bound_round(ma, mb, lo, width, k, PB: tl.constexpr):
    """One round of the lower-bound search over the bound-group maxima: the largest
    ``lo + width * j`` (j = 0..7) that about ``k`` maxima reach. Float rounding can make the
    bucket of a maximum disagree with a direct comparison, and counts can overflow their 9-bit
    fields, so the bound is only a guess here; the selection checks ``count(score >= bound) >= k``
    and takes the exact dense path if not."""
    inv = tl.where(width > 0, 1.0 / width, 0.0)  # width 0: an all-zero row, every maximum in bucket 0
    ba = tl.where(ma >= lo, ((ma - lo) * inv).to(tl.int32), -1)  # [SA, NT]
    acc = tl.sum(_onehot7(ba), axis=0)  # the thread's SA groups first
    if PB > 0:
        acc += _onehot7(tl.where(mb >= lo, ((mb - lo) * inv).to(tl.int32), -1))  # [NT]
    best = _best7(tl.sum(acc, axis=0), k)
    return lo + width * best


@triton.jit
def _row_columns(PA: tl.constexpr, PBW: tl.constexpr, NT: tl.constexpr, VEC: tl.constexpr):
    """Column indices of a row's block A ``[RA, NT, VEC]`` and block B ``[RB, NT, VEC]``."""
    t = tl.arange(0, NT)
    jv = tl.arange(0, VEC)
    ca = (tl.arange(0, PA // (NT * VEC))[:, None, None] * NT + t[None, :, None]) * VEC + jv[None, None, :]
    cb = PA + (tl.arange(0, PBW // (NT * VEC))[:, None, None] * NT + t[None, :, None]) * VEC + jv[None, None, :]
    return ca, cb


@triton.jit
def _task(task, row_layer_ptr, row_index_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_d_ptr,
          ALIGNED: tl.constexpr):
    """A task's weight row and its layer's height and element offsets (W, norms, null norms, output).

    ``ALIGNED`` (checked by the launcher) marks the W and norm offsets as multiples of 16 here, on
    the loads themselves: ``tl.multiple_of`` on a value returned from a helper marks the call, and
    after inlining every value it returns (the row index too)."""
    layer = tl.load(row_layer_ptr + task)
    w_off = tl.load(lay_w_ptr + layer)
    n_off = tl.load(lay_n_ptr + layer)
    z_off = tl.load(lay_z_ptr + layer)
    if ALIGNED:  # lets the compiler vectorize the row loads
        w_off = tl.multiple_of(w_off, 16)
        n_off = tl.multiple_of(n_off, 16)
        z_off = tl.multiple_of(z_off, 16)
    return tl.load(row_index_ptr + task), tl.load(lay_d_ptr + layer), w_off, n_off, z_off, tl.load(lay_o_ptr + layer)


@triton.jit
def _memorized_mask_kernel(
    w_ptr, n_ptr, z_ptr, out_ptr, scr_ptr, flag_ptr,
    row_layer_ptr, row_index_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_d_ptr,
    d_in, n_words, k, n_vec, n_t, n_rows, n_vw,
    PA: tl.constexpr, PB: tl.constexpr, PBW: tl.constexpr, NT: tl.constexpr, VEC: tl.constexpr,
    SA: tl.constexpr, CG: tl.constexpr, TB: tl.constexpr, DENSE: tl.constexpr, ALIGNED: tl.constexpr,
    EVEN: tl.constexpr, PREFETCH: tl.constexpr, QW: tl.constexpr, DEFER: tl.constexpr,
):
    """Persistent grid; a program takes one weight row at a time and loops over all vectors."""
    RA: tl.constexpr = PA // (NT * VEC)
    RB: tl.constexpr = PBW // (NT * VEC)
    NCH: tl.constexpr = CG * VEC // QW
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ca, cb = _row_columns(PA, PBW, NT, VEC)
    jr = tl.arange(0, 2 * VEC)
    tb = tl.arange(0, TB)
    scr = scr_ptr + pid.to(tl.int64) * (TB * (CG + 1) * 2 * VEC)  # [TB, CG + 1, VEC, 2] records
    # the first row's W; later rows' W is loaded one row ahead when PREFETCH (single vectors:
    # there the row loads are the critical path)
    raw_a = tl.zeros(ca.shape, dtype=w_ptr.dtype.element_ty)
    raw_b = tl.zeros(cb.shape, dtype=w_ptr.dtype.element_ty)
    if PREFETCH:
        w_first_off = tl.load(lay_w_ptr + tl.load(row_layer_ptr + pid))
        if ALIGNED and DEFER:
            w_first_off = tl.multiple_of(w_first_off, 16)
        w_first = w_ptr + w_first_off + tl.load(row_index_ptr + pid).to(tl.int64) * d_in
        raw_a = _load_cols(w_first, ca, d_in, 0.0, EVEN)
        if PB > 0:
            raw_b = _load_cols(w_first, cb, d_in, 0.0, EVEN)
    for task in range(pid, n_rows, nprog):
        row, d_out, w_off, n_off, z_off, o_off = _task(task, row_layer_ptr, row_index_ptr, lay_w_ptr, lay_n_ptr,
                                                       lay_z_ptr, lay_o_ptr, lay_d_ptr, ALIGNED)
        w_row = w_ptr + w_off + row.to(tl.int64) * d_in
        if not PREFETCH:
            raw_a = _load_cols(w_row, ca, d_in, 0.0, EVEN)
            if PB > 0:
                raw_b = _load_cols(w_row, cb, d_in, 0.0, EVEN)
        absa = _abs_row(raw_a, ca, d_in, EVEN)
        absb = absa  # placeholder when PB == 0 (never read)
        if PB > 0:
            absb = _abs_row(raw_b, cb, d_in, EVEN)
        if PREFETCH:
            nxt = task + nprog
            lim = tl.where(nxt < n_rows, d_in, 0)
            nxt = tl.minimum(nxt, n_rows - 1)
            nxt_off = tl.load(lay_w_ptr + tl.load(row_layer_ptr + nxt))
            if ALIGNED and DEFER:  # lets the compiler load VEC halves at once instead of one each
                nxt_off = tl.multiple_of(nxt_off, 16)
            nxt_w = w_ptr + nxt_off + tl.load(row_index_ptr + nxt).to(tl.int64) * d_in
            raw_a = tl.load(nxt_w + ca, mask=ca < lim, other=0.0)
            if PB > 0:
                raw_b = tl.load(nxt_w + cb, mask=cb < lim, other=0.0)
        for v0 in range(0, n_vec, TB):
            if DENSE:
                for i in range(0, TB):
                    v = v0 + i
                    if v < n_vec:
                        out_row = out_ptr + o_off + ((v // n_t).to(tl.int64) * d_out + row) * n_words
                        _dense_vector(absa, absb, n_ptr + n_off + v.to(tl.int64) * d_in,
                                      z_ptr + z_off + v.to(tl.int64) * d_in, out_row, ca, cb, d_in, n_words, k,
                                      PA, PB, PBW)
            else:
                cnt_all = tl.zeros([TB], dtype=tl.int32)
                lo_all = tl.zeros([TB], dtype=tl.int32)
                hi_all = tl.full([TB], 1, dtype=tl.int32)
                tl.debug_barrier()  # the previous chunk's readers are done with the scratch
                for i in range(0, TB):
                    v = v0 + i
                    if v < n_vec:
                        n_row = n_ptr + n_off + v.to(tl.int64) * d_in
                        sca = absa * _load_cols(n_row, ca, d_in, 1.0, EVEN)
                        gma = tl.max(sca, axis=2)  # [RA, NT] max of each VEC group
                        ma = tl.max(tl.reshape(gma, [SA, RA // SA, NT]), axis=1)  # [SA, NT] bound groups
                        top = tl.max(tl.max(ma, axis=1), axis=0)
                        scb = sca
                        gmb = gma
                        mb = ma
                        if PB > 0:
                            scb = absb * _load_cols(n_row, cb, d_in, 1.0, EVEN)
                            gmb = tl.max(scb, axis=2)
                            mb = tl.max(gmb, axis=0)  # [NT]
                            top = tl.maximum(top, tl.max(mb, axis=0))
                        lo = _bound_round(ma, mb, 0.0, top * 0.125, k, PB)
                        lo = _bound_round(ma, mb, lo, top * 0.015625, k, PB)
                        # slots of the candidate groups: in-thread rank + cross-thread exclusive scan
                        fa = gma >= lo
                        rank = tl.cumsum(fa.to(tl.int32), axis=0)
                        tot = tl.sum(fa.to(tl.int32), axis=0)
                        if PB > 0:
                            fb = gmb >= lo
                            rankb = tl.cumsum(fb.to(tl.int32), axis=0) + tot[None, :]
                            tot += tl.sum(fb.to(tl.int32), axis=0)
                        excl = tl.cumsum(tot, axis=0) - tot
                        # a record per candidate group: (score bits, column) for each of its VEC
                        # columns, one vector store; slots past CG all land on the spare slot CG
                        base = scr + i * ((CG + 1) * 2 * VEC)
                        # (clamped at 0 too: a provably non-negative offset makes cheaper addresses)
                        slot = tl.minimum(tl.maximum(excl[None, :] + rank - 1, 0), CG)
                        rec = tl.reshape(tl.join(sca.to(tl.int32, bitcast=True), ca), [RA, NT, 2 * VEC])
                        tl.store(base + slot[:, :, None] * (2 * VEC) + jr[None, None, :], rec, mask=fa[:, :, None])
                        if PB > 0:
                            slotb = tl.minimum(tl.maximum(excl[None, :] + rankb - 1, 0), CG)
                            recb = tl.reshape(tl.join(scb.to(tl.int32, bitcast=True), cb), [RB, NT, 2 * VEC])
                            tl.store(base + slotb[:, :, None] * (2 * VEC) + jr[None, None, :], recb,
                                     mask=fb[:, :, None])
                        cnt = tl.sum(tot, axis=0)
                        cnt_all = tl.where(tb == i, cnt, cnt_all)
                        lo_all = tl.where(tb == i, lo.to(tl.int32, bitcast=True), lo_all)
                        hi_all = tl.where(tb == i, top.to(tl.int32, bitcast=True) + 1, hi_all)
                tl.debug_barrier()  # candidates written by all threads before anyone reads them
                # candidates as [NCH, TB, QW] (QW <= 32: one value per lane), so that the warps
                # split the TB vectors and one vector's counts are in-thread sums over the NCH
                # chunks plus one warp reduction
                live = v0 + tb < n_vec
                ok = live & (cnt_all <= CG)
                q = tl.arange(0, NCH)[:, None, None] * QW + tl.arange(0, QW)[None, None, :]  # value index
                rec = scr + tb[None, :, None] * ((CG + 1) * 2 * VEC) + 2 * q
                bits = tl.load(rec, mask=ok[None, :, None] & (q < cnt_all[None, :, None] * VEC), other=-1)
                # exact k-th largest: count(bits >= lo) >= k > count(bits >= hi), where the bound
                # lo is checked first (it is only a guess, see _bound_round)
                # exact selection: bisect on the float bits with count(bits >= lo) >= k >
                # count(bits >= hi), stopping as soon as exactly k candidates are >= lo (they
                # are then the top k); the bound is checked first (it is only a guess)
                lo = tl.where(ok, lo_all, 0)
                c_lo = _count(bits >= lo[None, :, None])
                ok = ok & (c_lo >= k)
                hi = tl.where(ok, hi_all, lo + 1)
                hi = tl.where(c_lo == k, lo + 1, hi)
                while tl.max(hi - lo, axis=0) > 1:
                    mid = lo + (hi - lo) // 2
                    c = _count(bits >= mid[None, :, None])
                    up = (c >= k) & (hi - lo > 1)
                    lo = tl.where(up, mid, lo)
                    c_lo = tl.where(up, c, c_lo)
                    hi = tl.where(up, hi, tl.where(hi - lo > 1, mid, hi))
                    hi = tl.where(c_lo == k, lo + 1, hi)
                ok = ok & (c_lo == k)  # else equal scores straddle the k-th place: the dense path decides
                sel = (bits >= lo[None, :, None]) & ok[None, :, None]
                # null comparison on the selected candidates only
                vv = (v0 + tb).to(tl.int64)
                col = tl.load(rec + 1, mask=sel, other=0)
                wsel = tl.load(w_row + col, mask=sel, other=0.0)
                zsel = tl.load(z_ptr + z_off + vv[None, :, None] * d_in + col, mask=sel, other=0.0)
                score = bits.to(tl.float32, bitcast=True)
                sel = sel & (score > tl.abs(wsel.to(tl.float32)) * zsel)
                out_v = out_ptr + o_off + ((vv // n_t) * d_out + row) * n_words
                tl.atomic_or(out_v[None, :, None] + (col >> 5), (1 << (col & 31)), mask=sel, sem="relaxed")
                spill = live & ~ok
                if DEFER:
                    # flag (row, vector) for _dense_fallback_kernel: keeping the dense path out of
                    # this kernel keeps its registers out of this kernel's allocation
                    vs = v0 + tb
                    tl.atomic_or(flag_ptr + task * n_vw + (vs >> 5), 1 << (vs & 31), mask=spill,
                                 sem="relaxed")
                elif tl.max(spill.to(tl.int32), axis=0) > 0:
                    for i in range(0, TB):
                        if tl.max(tl.where(tb == i, spill.to(tl.int32), 0), axis=0) > 0:
                            vs = v0 + i
                            out_s = out_ptr + o_off + ((vs // n_t).to(tl.int64) * d_out + row) * n_words
                            _dense_vector(absa, absb, n_ptr + n_off + vs.to(tl.int64) * d_in,
                                          z_ptr + z_off + vs.to(tl.int64) * d_in, out_s, ca, cb, d_in, n_words, k,
                                          PA, PB, PBW)


@triton.jit
def _dense_fallback_kernel(
    w_ptr, n_ptr, z_ptr, out_ptr, flag_ptr,
    row_layer_ptr, row_index_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_d_ptr,
    d_in, n_words, k, n_t, n_rows, n_vw,
    PA: tl.constexpr, PB: tl.constexpr, PBW: tl.constexpr, NT: tl.constexpr, VEC: tl.constexpr,
    EVEN: tl.constexpr,
):
    """The exact dense path for the (row, vector) pairs that the main kernel flagged (deferred variant)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ca, cb = _row_columns(PA, PBW, NT, VEC)
    for task in range(pid, n_rows, nprog):
        flags = flag_ptr + task * n_vw
        for wv in range(0, n_vw):
            word = tl.load(flags + wv)
            if word != 0:  # rare: the W row is loaded only for rows with a flagged vector
                row, d_out, w_off, n_off, z_off, o_off = _task(task, row_layer_ptr, row_index_ptr, lay_w_ptr,
                                                               lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_d_ptr, False)
                w_row = w_ptr + w_off + row.to(tl.int64) * d_in
                absa = _abs_row(_load_cols(w_row, ca, d_in, 0.0, EVEN), ca, d_in, EVEN)
                absb = absa
                if PB > 0:
                    absb = _abs_row(_load_cols(w_row, cb, d_in, 0.0, EVEN), cb, d_in, EVEN)
                for b in range(0, 32):
                    if ((word >> b) & 1) != 0:
                        v = wv * 32 + b
                        out_row = out_ptr + o_off + ((v // n_t).to(tl.int64) * d_out + row) * n_words
                        _dense_vector(absa, absb, n_ptr + n_off + v.to(tl.int64) * d_in,
                                      z_ptr + z_off + v.to(tl.int64) * d_in, out_row, ca, cb, d_in, n_words, k,
                                      PA, PB, PBW)


@dataclasses.dataclass
class _Layer:
    weight: torch.Tensor
    sumsq: torch.Tensor  # [S, T, d_in] float32
    null_sumsq: torch.Tensor
    k: int
    out: torch.Tensor  # [S, d_out, n_words] int32


def memorized_mask_triton(weight, sumsq, null_sumsq, k: int, out) -> None:
    """OR into ``out`` the memorized mask of one layer (canonical backend signature).

    Args:
        weight: ``[d_out, d_in]`` float16/bfloat16/float32, contiguous.
        sumsq, null_sumsq: ``[S, T, d_in]`` float32, contiguous, finite, >= 0.
        k: weights kept per row by the top-k (eq. 5).
        out: ``[S, d_out, ceil(d_in / 32)]`` int32 words, OR-ed in place (union over T).
    """
    memorized_mask_multi_triton([weight], [sumsq], [null_sumsq], [k], [out])


def memorized_mask_multi_triton(weights: Sequence, sumsqs: Sequence, null_sumsqs: Sequence,
                                ks: Sequence[int], outs: Sequence) -> None:
    """Several layers, one launch per (d_in, dtype, k, S, T) group; same effect as one call each.

    A launch reaches every layer of its group through element offsets from the group's first
    tensor (the layers stay where they are: no copy of W) and a task -> (layer, row) table. The
    square roots of all statistics are taken by one ``reference.feature_norms`` over their
    concatenation, so they are bit-identical to the reference's.
    """
    layers = [_Layer(w, s, n, k, o) for w, s, n, k, o in zip(weights, sumsqs, null_sumsqs, ks, outs)]
    flat = [x.reshape(-1) for lay in layers for x in (lay.sumsq, lay.null_sumsq)]
    roots = feature_norms(torch.cat(flat))
    starts, pos = [], 0
    for x in flat:
        starts.append(pos)
        pos += x.numel()
    if _config.mask_kernel() == "stream" and mask_stream.stream_eligible([lay.k for lay in layers]):
        # one launch per (W dtype, S, T): every width in the same kernel
        streams: dict[tuple, list[int]] = defaultdict(list)
        for i, lay in enumerate(layers):
            streams[(lay.weight.dtype, *lay.sumsq.shape[:2])].append(i)
        for (_, s, t), idx in streams.items():
            mask_stream.launch_stream([layers[i].weight for i in idx], roots, [starts[2 * i] for i in idx],
                                      [starts[2 * i + 1] for i in idx], [layers[i].k for i in idx],
                                      [layers[i].out for i in idx], s * t, t)
        return
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, lay in enumerate(layers):
        s, t, d_in = lay.sumsq.shape
        groups[(d_in, lay.weight.dtype, lay.k, s, t)].append(i)
    for (d_in, _, k, s, t), idx in groups.items():
        _launch([layers[i] for i in idx], roots, [starts[2 * i] for i in idx], [starts[2 * i + 1] for i in idx],
                d_in, k, s, t)


_ROW_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _row_tables(heights: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """task -> (layer, row) for layers of the given heights, built once per (heights, device)."""
    key = (heights, str(device))
    if key not in _ROW_TABLES:
        sizes = torch.tensor(heights, dtype=torch.int64)
        layer = torch.repeat_interleave(torch.arange(len(heights), dtype=torch.int32), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        row = (torch.arange(int(sizes.sum())) - torch.repeat_interleave(starts, sizes)).to(torch.int32)
        if len(_ROW_TABLES) > 64:
            _ROW_TABLES.clear()
        _ROW_TABLES[key] = (layer.to(device), row.to(device))
    return _ROW_TABLES[key]


def _launch(layers: list[_Layer], roots: torch.Tensor, n_starts: list[int], z_starts: list[int],
            d_in: int, k: int, s: int, t: int) -> None:
    device = layers[0].weight.device
    n_vec = s * t
    cfg = _config.mask_config(d_in, k, n_vec)
    w_base, w_offs = _config.element_offsets([lay.weight for lay in layers])
    o_base, o_offs = _config.element_offsets([lay.out for lay in layers])
    heights = tuple(lay.weight.shape[0] for lay in layers)
    row_layer, row_index = _row_tables(heights, device)
    n_rows = sum(heights)
    aligned = all(x % 16 == 0 for x in (*w_offs, *n_starts, *z_starts, d_in))
    tab = lambda vals, dt: _config.device_table(tuple(vals), dt, device)
    occupancy_key = (cfg, d_in, w_base.dtype, str(device))
    per_sm = _OCCUPANCY.get(occupancy_key, cfg.progs_per_sm)
    nprog = max(1, min(n_rows, per_sm * _config.num_sms(device)))
    scratch = torch.empty(nprog * cfg.chunk * (cfg.cand + 1) * 2 * cfg.vec, dtype=torch.int32, device=device)
    defer = cfg.fallback == "deferred" and not cfg.dense
    n_vw = (n_vec + 31) // 32
    # deferred: one bit per (row, vector) that needs the dense path, OR-ed by the main kernel
    flags = torch.zeros(n_rows * n_vw if defer else 1, dtype=torch.int32, device=device)
    tables = (row_layer, row_index, tab(w_offs, torch.int64), tab(n_starts, torch.int64),
              tab(z_starts, torch.int64), tab(o_offs, torch.int64), tab(heights, torch.int32))
    row_tile = dict(PA=cfg.pa, PB=cfg.pb, PBW=cfg.pb or 32 * cfg.num_warps * cfg.vec, NT=32 * cfg.num_warps,
                    VEC=cfg.vec, EVEN=cfg.pa + cfg.pb == d_in)
    # a cap above 65536 / threads would make the launch fail (16 warps, d_in 16384: at most 128)
    maxnreg = min(cfg.maxnreg, 65536 // (32 * cfg.num_warps) // 8 * 8)
    regs_cap = {"maxnreg": maxnreg} if cfg.maxnreg and not _config.interpreting() else {}
    compiled = _memorized_mask_kernel[(nprog,)](
        w_base, roots, roots, o_base, scratch, flags, *tables,
        d_in, (d_in + 31) // 32, k, n_vec, t, n_rows, n_vw,
        **row_tile, SA=cfg.sa, CG=cfg.cand, TB=cfg.chunk, DENSE=cfg.dense, ALIGNED=aligned,
        PREFETCH=n_vec <= 2, QW=min(32, cfg.cand * cfg.vec), DEFER=defer, num_warps=cfg.num_warps, **regs_cap,
    )
    if defer:
        _dense_fallback_kernel[(max(1, min(n_rows, 4 * _config.num_sms(device))),)](
            w_base, roots, roots, o_base, flags, *tables,
            d_in, (d_in + 31) // 32, k, t, n_rows, n_vw, **row_tile, num_warps=cfg.num_warps,
        )
    regs = getattr(compiled, "n_regs", 0)
    if device.type == "cuda" and regs and occupancy_key not in _OCCUPANCY and not _config.mask_forced("progs_per_sm"):
        # persistent grid: as many programs per SM as its registers hold (at most 64 warps)
        _OCCUPANCY[occupancy_key] = max(1, min(65536 // (regs * 32 * cfg.num_warps), 64 // cfg.num_warps))


# programs per SM that fit, learned from the compiled kernel's register count on first launch
_OCCUPANCY: dict[tuple, int] = {}
