"""How fast can a Triton kernel stream W and compute pass 1's scores? Probe kernels at SD1.5's bytes.

The memorized_mask kernel's pass 1 alone (one warp per row, 32 programs per SM) reads W at 2.0 TB/s,
half the copy rate (BENCHMARKS.md, stage timings). This probe times a bare pass 1, one variant at
a time, to find the streaming structure that reaches the copy rate: rows and warps per program,
chunk width, the statistics loads, the block-maxima stores, and Triton's pipeliner. Each variant
reads a [rows, 5120] fp16 W of SD1.5's FFN-2 byte count (99 MB), computes ``|W| * n`` per chunk,
keeps a running maximum per row (checked against torch) and optionally stores 8-column maxima.

Run on a CUDA machine from the repository root:  python benchmarks/bench_stream_probe.py
(``--interpret-check`` runs every variant once at a tiny size under TRITON_INTERPRET=1, no GPU.)
Writes $OUT/stream_probe.csv when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--interpret-check" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# (name, rows per program, chunk columns, warps, load n, store block maxima, pipeliner stages)
VARIANTS = [
    ("as pass 1: 1 row, 1 warp", 1, 256, 1, True, True, 0),
    ("1 row, 1 warp, W only", 1, 256, 1, False, False, 0),
    ("1 row, 1 warp, no maxima store", 1, 256, 1, True, False, 0),
    ("1 row, 1 warp, chunk 1024", 1, 1024, 1, True, True, 0),
    ("1 row, 1 warp, pipelined 4", 1, 256, 1, True, True, 4),
    ("4 rows, 4 warps", 4, 256, 4, True, True, 0),
    ("4 rows, 4 warps, W only", 4, 256, 4, False, False, 0),
    ("8 rows, 8 warps", 8, 256, 8, True, True, 0),
    ("4 rows, 4 warps, chunk 512", 4, 512, 4, True, True, 0),
    ("4 rows, 4 warps, pipelined 3", 4, 256, 4, True, True, 3),
    ("2 rows, 1 warp", 2, 256, 1, True, True, 0),
]

# Column-slab layout: a program owns CH columns (its norms loaded once, kept in registers) and walks
# a range of rows, so no norm is re-read per row. (name, rows per step, chunk columns, warps,
# rows per program, pipeliner stages)
SLAB_VARIANTS = [
    ("slab 256 cols, 1 row/step, 1 warp", 1, 256, 1, 64, 0),
    ("slab 256 cols, 4 rows/step, 4 warps", 4, 256, 4, 128, 0),
    ("slab 256 cols, 4 rows/step, pipelined 3", 4, 256, 4, 128, 3),
    ("slab 512 cols, 2 rows/step, 4 warps", 2, 512, 4, 128, 0),
]


@triton.jit
def _probe_kernel(w_ptr, n_ptr, top_ptr, bmx_ptr, n_rows, d_in,
                  ROWS: tl.constexpr, CH: tl.constexpr, LOAD_N: tl.constexpr, STORE: tl.constexpr,
                  PIPE: tl.constexpr):
    """Rows ``[ROWS]`` of W: running max of ``|W| * n`` per row, 8-column maxima to ``bmx``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < n_rows
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * d_in
    cols = tl.arange(0, CH)
    top = tl.full([ROWS, CH], -1.0, tl.float32)
    for c0 in tl.range(0, d_in, CH, num_stages=PIPE):
        c = c0 + cols
        s = tl.abs(tl.load(w_rows + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32))
        if LOAD_N:
            s = s * tl.load(n_ptr + c)[None, :]
        if STORE:
            bm = tl.max(tl.reshape(s, [ROWS, CH // 8, 8]), axis=2)
            tl.store(bmx_ptr + rows.to(tl.int64)[:, None] * (d_in // 8) + (c0 // 8 + tl.arange(0, CH // 8))[None, :],
                     bm, mask=ok[:, None])
        top = tl.maximum(top, s)
    tl.store(top_ptr + rows, tl.max(top, axis=1), mask=ok)


@triton.jit
def _slab_kernel(w_ptr, n_ptr, top_ptr, bmx_ptr, n_rows, d_in, rows_per_prog,
                 ROWS: tl.constexpr, CH: tl.constexpr, PIPE: tl.constexpr):
    """Columns ``[CH]`` of rows ``rows_per_prog``: per (row, slab) maximum of ``|W| * n`` to ``top``,
    8-column maxima to ``bmx``; the slab's norms are loaded once."""
    slab = tl.program_id(0)
    n_slabs = tl.num_programs(0)
    c = slab * CH + tl.arange(0, CH)
    nv = tl.load(n_ptr + c)
    r_begin = tl.program_id(1) * rows_per_prog
    for r0 in tl.range(r_begin, r_begin + rows_per_prog, ROWS, num_stages=PIPE):
        rows = r0 + tl.arange(0, ROWS)
        ok = rows < n_rows
        r64 = rows.to(tl.int64)
        s = tl.abs(tl.load(w_ptr + r64[:, None] * d_in + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32))
        s = s * nv[None, :]
        bm = tl.max(tl.reshape(s, [ROWS, CH // 8, 8]), axis=2)
        tl.store(bmx_ptr + r64[:, None] * (d_in // 8) + (slab * (CH // 8) + tl.arange(0, CH // 8))[None, :],
                 bm, mask=ok[:, None])
        tl.store(top_ptr + r64 * n_slabs + slab, tl.max(s, axis=1), mask=ok)


def run_slab(variant, w, n, top, bmx):
    _, rows, ch, warps, per_prog, pipe = variant
    grid = (w.shape[1] // ch, triton.cdiv(w.shape[0], per_prog))
    _slab_kernel[grid](w, n, top, bmx, w.shape[0], w.shape[1], per_prog, ROWS=rows, CH=ch, PIPE=pipe,
                       num_warps=warps)


def check_slab(variant, w, n, top, bmx) -> bool:
    run_slab(variant, w, n, top, bmx)
    s = w.float().abs() * n
    n_slabs = w.shape[1] // variant[2]
    good = torch.equal(top.view(-1)[: w.shape[0] * n_slabs].view(w.shape[0], n_slabs).amax(dim=1),
                       s.max(dim=1).values)
    return good and torch.equal(bmx.view(w.shape[0], -1), s.view(w.shape[0], -1, 8).amax(dim=2))


def run(variant, w, n, top, bmx):
    _, rows, ch, warps, load_n, store, pipe = variant
    grid = (triton.cdiv(w.shape[0], rows),)
    _probe_kernel[grid](w, n, top, bmx, w.shape[0], w.shape[1], ROWS=rows, CH=ch, LOAD_N=load_n, STORE=store,
                        PIPE=pipe, num_warps=warps)


def check(variant, w, n, top, bmx) -> bool:
    run(variant, w, n, top, bmx)
    s = w.float().abs() * (n if variant[4] else torch.ones_like(n))
    good = torch.equal(top, s.max(dim=1).values)
    if variant[5]:
        good = good and torch.equal(bmx.view(w.shape[0], -1), s.view(w.shape[0], -1, 8).amax(dim=2))
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret-check", action="store_true", help="tiny sizes on the CPU interpreter")
    args = parser.parse_args()
    if args.interpret_check:
        w = torch.randn(8, 1024).half()
        n = torch.rand(1024) + 0.5
        bad = [v[0] for v in VARIANTS if not check(v, w, n, torch.empty(8), torch.empty(8 * 128))]
        bad += [v[0] for v in SLAB_VARIANTS if not check_slab(v, w, n, torch.empty(8 * 4), torch.empty(8 * 128))]
        print("all variants match torch" if not bad else f"MISMATCH: {bad}")
        return 1 if bad else 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    import datetime

    import triton.testing as tt
    from _meta import git_commit, gpu_name, write_rows

    d_in = 5120
    n_rows = 49_561_600 // d_in  # SD1.5's FFN-2 weights, 16 layers
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n_rows, d_in, device="cuda", dtype=torch.float16, generator=g)
    n = torch.rand(d_in, device="cuda", generator=g) + 0.5
    top = torch.empty(n_rows * (d_in // 256), device="cuda")  # per (row, slab) for the slab variants
    bmx = torch.empty(n_rows * d_in // 8, device="cuda")
    gb = w.numel() * 2 / 1e9
    copy_ms = tt.do_bench(lambda: w.clone(), rep=100)
    info = {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "triton": triton.__version__}
    print(f"{info['gpu']}  triton {info['triton']}  W {gb * 1e3:.0f} MB; copy {2 * gb / copy_ms * 1e3:.0f} GB/s "
          f"(read + write)")
    out = []
    # rows layouts keep one maximum per row, slab layouts one per (row, slab)
    runs = [(v, check, run, top[:n_rows]) for v in VARIANTS] + [(v, check_slab, run_slab, top) for v in SLAB_VARIANTS]
    for v, chk, go, tops in runs:
        ok = chk(v, w, n, tops, bmx)
        t = tt.do_bench_cudagraph(lambda v=v, go=go, tops=tops: go(v, w, n, tops, bmx), rep=100,
                                  quantiles=[0.5, 0.2, 0.8])
        rate = gb / t[0] * 1e3
        out.append({"variant": v[0], "median_us": round(t[0] * 1e3, 2), "p20_us": round(t[1] * 1e3, 2),
                    "p80_us": round(t[2] * 1e3, 2), "w_read_GBps": round(rate), "exact": ok, **info})
        print(f"  {v[0]:<34} {t[0] * 1e3:8.1f} us  W read at {rate:5.0f} GB/s  {'ok' if ok else 'MISMATCH'}",
              flush=True)
    write_rows(out, "stream_probe.csv")
    return 0 if all(r["exact"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
