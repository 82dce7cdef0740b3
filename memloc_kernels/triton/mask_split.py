"""memorized_mask in two kernels (variant "split"): a multi-warp pass 1, then the blocks kernel's selection.

Why (BENCHMARKS.md, stage timings): in the one-kernel blocks variant, pass 1 (streaming W and the
norms into block maxima) runs at the occupancy that the selection's 128 registers allow, 16
one-warp programs per SM, and alone takes 64 µs of the 120; at 32 programs per SM it takes 49.
Here pass 1 is its own kernel: programs of R warps stream R rows of a layer (one row per warp, the
norm chunk loaded once for all R), write every 8-column block maximum to a global buffer, and find
each row's bound as the blocks kernel does (bisection on the strided group maxima). Then
``_blocks_mask_kernel`` with ``FROM_PASS1`` reads the bound and block maxima instead of computing
them, and selects exactly as in the one-kernel variant, so the masks are the same bit for bit.

The buffer holds ``sum(d_out * d_in / 8)`` floats per statistics vector (24.8 MB for SD1.5's 16
layers), so batches run in groups of whole subsets (``T`` vectors each) that fit ``SPLIT_BYTES``.
Not measured on a GPU yet; ``stream_overrides(variant="split")`` selects it, with ``rows`` (warps
per pass-1 program, default 4), ``group`` (vectors per group) and ``by_width`` (one selection launch
per layer width, each with a tile sized by its own k) as further overrides.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import _config
from .mask_stream import _blocks_mask_kernel, _item, _item_tables, bound_rows

#: Upper bound for the block-maxima buffer of one group of vectors.
SPLIT_BYTES = 256 << 20


@triton.jit
def _pass1_rows_kernel(w_ptr, n_ptr, bmx_ptr, pre_ptr, item_layer_ptr, item_row_ptr, item_vec_ptr,
                       lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr, lay_dout_ptr, lay_din_ptr, lay_k_ptr,
                       lay_b_ptr, lay_r_ptr, n_vec,
                       R: tl.constexpr, CH: tl.constexpr, BOUND_STEPS: tl.constexpr, EVEN: tl.constexpr,
                       ALIGNED: tl.constexpr, PIPE: tl.constexpr):
    """Rows ``[R]`` of one layer for one vector: block maxima to ``bmx``, (bound, top) bits to ``pre``."""
    NB: tl.constexpr = CH // 8
    item = tl.program_id(0)
    layer = tl.load(item_layer_ptr + item)
    row0, v, _, d_in, d_out, k, w_off, n_off, _, _ = _item(
        item, item_layer_ptr, item_row_ptr, item_vec_ptr, lay_w_ptr, lay_n_ptr, lay_z_ptr, lay_o_ptr,
        lay_dout_ptr, lay_din_ptr, lay_k_ptr, n_vec, 1, ALIGNED, False)
    v = v.to(tl.int64)
    n_blocks = (d_in + 7) // 8
    rows = row0 + tl.arange(0, R)
    row_ok = rows < d_out
    prob = v * d_out + rows  # [R] problem index within the layer's part of the buffers
    w_rows = w_ptr + w_off + rows.to(tl.int64)[:, None] * d_in  # [R, 1]
    b_rows = bmx_ptr + tl.load(lay_b_ptr + layer) + prob[:, None] * n_blocks  # [R, 1]
    n_row = n_ptr + n_off + v * d_in
    cols = tl.arange(0, CH)
    bidx = tl.arange(0, NB)
    gmax = tl.full([R, CH], -1.0, tl.float32)
    for c0 in tl.range(0, d_in, CH, num_stages=PIPE):
        c = c0 + cols
        if EVEN:
            w = tl.load(w_rows + c[None, :], mask=row_ok[:, None], other=0.0)
            s = tl.abs(w.to(tl.float32)) * tl.load(n_row + c)[None, :]
        else:
            w = tl.load(w_rows + c[None, :], mask=row_ok[:, None] & (c < d_in)[None, :], other=0.0)
            s = tl.abs(w.to(tl.float32)) * tl.load(n_row + c, mask=c < d_in, other=0.0)[None, :]
            s = tl.where((c < d_in)[None, :], s, -1.0)
        b = c0 // 8 + bidx
        tl.store(b_rows + b[None, :], tl.max(tl.reshape(s, [R, NB, 8]), axis=2),
                 mask=row_ok[:, None] & (b < n_blocks)[None, :])
        gmax = tl.maximum(gmax, s)
    lo, top = bound_rows(gmax, k, BOUND_STEPS)  # the same bound as the blocks kernel's, per row
    pre = pre_ptr + 2 * (tl.load(lay_r_ptr + layer) + prob)
    tl.store(pre, lo, mask=row_ok)
    tl.store(pre + 1, top, mask=row_ok)


def group_size(heights, d_ins, n_vec: int, n_t: int, forced: int = 0) -> int:
    """Vectors per group: whole subsets (multiples of ``n_t``) whose block maxima fit SPLIT_BYTES."""
    per_vec = 4 * sum(h * -(-d // 8) for h, d in zip(heights, d_ins))
    if forced:
        if forced % n_t:
            raise ValueError(f"group must be a multiple of the timesteps per subset ({n_t}), got {forced}")
        return min(forced, n_vec)
    return min(n_vec, n_t * max(1, SPLIT_BYTES // (per_vec * n_t)))


def launch_split(weights, roots, n_starts, z_starts, ks, outs, n_vec: int, n_t: int, stats, cfg_of) -> None:
    """Both kernels for every group of vectors; arguments as ``mask_stream.launch_stream``'s, and
    ``cfg_of(d_ins, ks, n_vec, n_rows, device)``, its StreamConfig heuristic."""
    device = weights[0].device
    heights = [w.shape[0] for w in weights]
    d_ins = [w.shape[1] for w in weights]
    n_blocks = [-(-d // 8) for d in d_ins]
    forced = _config.stream_forced()
    group = group_size(heights, d_ins, n_vec, n_t, int(forced.get("group", 0)))
    rows = int(forced.get("rows", 4))
    w_base, w_offs = _config.element_offsets(weights)
    o_base, o_offs = _config.element_offsets(outs)
    b_offs, r_offs, b_total, r_total = [], [], 0, 0
    for h, nb in zip(heights, n_blocks):
        b_offs.append(b_total)
        r_offs.append(r_total)
        b_total += group * h * nb
        r_total += group * h
    bmx = torch.empty(b_total, dtype=torch.float32, device=device)
    pre = torch.empty(2 * r_total, dtype=torch.int32, device=device)
    tab = lambda vals, dt: _config.device_table(tuple(vals), dt, device)
    for g0 in range(0, n_vec, group):
        g = min(group, n_vec - g0)
        cfg = cfg_of(d_ins, ks, g, sum(heights), device)
        ns = [n + g0 * d for n, d in zip(n_starts, d_ins)]
        zs = [z + g0 * d for z, d in zip(z_starts, d_ins)]
        os_ = [o + (g0 // n_t) * h * -(-d // 32) for o, h, d in zip(o_offs, heights, d_ins)]
        aligned = all(x % 16 == 0 for x in (*w_offs, *ns, *zs, *d_ins))
        even = all(d % cfg.chunk == 0 for d in d_ins)
        layer_tabs = (tab(w_offs, torch.int64), tab(ns, torch.int64), tab(zs, torch.int64), tab(os_, torch.int64),
                      tab(heights, torch.int32), tab(d_ins, torch.int32), tab(ks, torch.int32))
        lay_b, lay_r = tab(b_offs, torch.int64), tab(r_offs, torch.int64)
        # pass-1 items: R rows x one vector each (the blocks kernel's item order, widest first)
        p_lay, p_row, p_vec = _item_tables(heights, d_ins, g, dataclasses.replace(cfg, rows=rows, span=1), device)
        _pass1_rows_kernel[(p_lay.numel(),)](
            w_base, roots, bmx, pre, p_lay, p_row, p_vec, *layer_tabs, lay_b, lay_r, g,
            R=rows, CH=cfg.chunk, BOUND_STEPS=cfg.bound_steps, EVEN=even, ALIGNED=aligned,
            PIPE=max(cfg.pipe, 1), num_warps=rows)
        # the selection: one launch, or (by_width) one per layer width, each with a tile sized by
        # its own largest k (narrow layers then gather 32 or 64 blocks instead of the widest's 128)
        classes = sorted(set(d_ins), reverse=True) if forced.get("by_width") else [None]
        for width in classes:
            hs = [h if width in (None, d) else 0 for h, d in zip(heights, d_ins)]  # other layers: no items
            kk = [kv for kv, d in zip(ks, d_ins) if width in (None, d)]
            sel_cfg = cfg if width is None else cfg_of([width], kk, g, sum(hs), device)
            _select(sel_cfg, hs, d_ins, g, n_t, w_base, roots, o_base, bmx, pre, stats, layer_tabs, lay_b, lay_r,
                    aligned, all(d % sel_cfg.chunk == 0 for d, h in zip(d_ins, hs) if h), forced, device)


def _select(cfg, heights, d_ins, n_vec, n_t, w_base, roots, o_base, bmx, pre, stats, layer_tabs, lay_b, lay_r,
            aligned, even, forced, device) -> None:
    """The blocks kernel on pass 1's bounds and block maxima for the layers with a height here."""
    lay, row, vec = _item_tables(heights, d_ins, n_vec, cfg, device)
    n_items = lay.numel()
    key = (cfg, w_base.dtype, str(device))
    nprog = max(1, min(n_items, _OCCUPANCY.get(key, cfg.progs_per_sm) * _config.num_sms(device)))
    regs_cap = {"maxnreg": cfg.maxnreg} if cfg.maxnreg and not _config.interpreting() else {}
    lst = torch.empty(nprog * cfg.cap, dtype=torch.int32, device=device)
    compiled = _blocks_mask_kernel[(nprog,)](
        w_base, roots, roots, o_base, bmx, lst, stats, lay, row, vec, *layer_tabs, n_items, n_vec, n_t, cfg.span, 0,
        CH=cfg.chunk, CAPB=cfg.cap, BOUND_STEPS=cfg.bound_steps, EVEN=even, ALIGNED=aligned,
        TWO_LEVEL=True, PREFETCH=0, STAGES=3, PIPE=0, FROM_PASS1=True, REFINE=bool(cfg.refine), pre_ptr=pre,
        lay_b_ptr=lay_b, lay_r_ptr=lay_r, num_warps=1, **regs_cap)
    regs = getattr(compiled, "n_regs", 0)
    if device.type == "cuda" and regs and key not in _OCCUPANCY and "progs_per_sm" not in forced:
        _OCCUPANCY[key] = max(1, min(65536 // (regs * 32), 32))  # one-warp programs the registers allow


_OCCUPANCY: dict[tuple, int] = {}
