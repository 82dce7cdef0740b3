"""Sweep the streaming memorized_mask kernel's settings against the tile kernel and CUDA (SD1.5, SDXL).

Run from the repository root on a CUDA machine:  python benchmarks/bench_mask_stream.py
Every setting is checked against the reference first (single vector: all layers; batched: the first
2 subsets), then timed: one (subset, timestep) inside a CUDA graph, and a 100 x 10 batch per vector.
Also counts the problems that took the slow exact path and the programs per SM that the compiled
kernel's registers allow. Writes $OUT/mask_stream.csv when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from _masks import SD15, SDXL, SPARSITY, empty_outs, layer_stats, mismatches  # noqa: E402
from _meta import git_commit, gpu_name, write_rows  # noqa: E402

# (name, kernel, stream overrides) for the single-vector and the batched measurements
# Settings measured on 2026-11-29 (BENCHMARKS.md) that lost are left out; add them back to re-check.
SINGLE = [
    ("tile (first kernel)", "tile", {}),
    ("blocks (default)", "stream", {}),
    ("split: pass 1 in 4-row programs", "stream", {"variant": "split"}),
    ("blocks prefetch 1 by hand", "stream", {"pipe": 0, "prefetch": 1}),
    ("blocks, tile k + k/8, bound raised on overflow", "stream", {"refine": 1}),
    ("split: pass 1 in 8-row programs", "stream", {"variant": "split", "rows": 8}),
    ("split: 2-row programs, no pipeliner", "stream", {"variant": "split", "rows": 2, "pipe": 0}),
    ("split, selection per width", "stream", {"variant": "split", "by_width": 1}),
    ("list r1 w1", "stream", {"variant": "list", "rows": 1, "num_warps": 1}),
    ("blocks-bisect w1 nreg128", "stream", {"variant": "blocks-bisect", "num_warps": 1, "maxnreg": 128}),
]
BATCHED = [
    ("tile (first kernel)", "tile", {}),
    ("blocks (default)", "stream", {}),
    ("split: pass 1 in 4-row programs", "stream", {"variant": "split"}),
    ("blocks prefetch 1 by hand", "stream", {"pipe": 0, "prefetch": 1}),
    ("blocks, tile k + k/8, bound raised on overflow", "stream", {"refine": 1}),
    ("split: pass 1 in 8-row programs", "stream", {"variant": "split", "rows": 8}),
    ("split, selection per width", "stream", {"variant": "split", "by_width": 1}),
    ("list r1 w1", "stream", {"variant": "list", "rows": 1, "vectors": 1, "num_warps": 1}),
]
# a few settings also on SDXL shapes and on statistics with a few dominant columns
EXTRA = (0, 1, 2, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first three settings of each list only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VAL,...",
                        help="time these stream overrides (e.g. chunk=512,prefetch=1) against the default "
                             "instead of the built-in lists; may be repeated")
    args = parser.parse_args()
    if args.set:
        custom = [(s, "stream", {k: (int(v) if v.lstrip("-").isdigit() else v)
                                 for k, v in (kv.split("=", 1) for kv in s.split(","))}) for s in args.set]
        SINGLE[:] = [SINGLE[1], *custom]
        BATCHED[:] = [BATCHED[1], *custom]
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    import datetime

    import triton
    import triton.testing as tt

    import memloc_kernels as mk
    from memloc_kernels.triton import _config, mask_stream

    info = {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "triton": triton.__version__, "torch": torch.__version__}
    print(f"{info['gpu']}  torch {torch.__version__}  triton {info['triton']}  commit {info['commit']}", flush=True)
    q = [0.5, 0.2, 0.8]
    counters = mask_stream._counters(torch.device("cuda", torch.cuda.current_device()))  # [slow, refined]
    rows = []

    def run(case, name, kernel, over, data, lead, graph, per):
        counters.zero_()
        with _config.mask_overrides(kernel=kernel), _config.stream_overrides(**over):
            before = set(mask_stream._OCCUPANCY)
            bad = mismatches(mk, *data, subsets=2 if lead else None)
            occ = [v for key, v in mask_stream._OCCUPANCY.items() if key not in before]
            outs = empty_outs(mk, data[0], lead)
            fn = functools.partial(mk.memorized_masks, *data, SPARSITY, outs=outs, check_finite=False,
                                   backend="triton")
            fn()
            torch.cuda.synchronize()
            slow, refined = (int(x) for x in counters.tolist())
            t = tt.do_bench_cudagraph(fn, rep=100, quantiles=q) if graph else tt.do_bench(fn, warmup=1, rep=300,
                                                                                           quantiles=q)
        t = [x * 1e3 / per for x in t]
        row = {"case": case, "setting": name, "median_us": round(t[0], 2), "p20_us": round(t[1], 2),
               "p80_us": round(t[2], 2), "mismatches": bad, "slow_path_problems": slow,
               "refined_problems": refined,
               "programs_per_sm": occ[0] if occ else "", **info}
        rows.append(row)
        print(f"  {case:<18} {name:<26} {t[0]:9.1f} us  (p20 {t[1]:.1f}, p80 {t[2]:.1f})  bad {bad}  "
              f"slow {slow}  refined {refined}  programs/SM {row['programs_per_sm']}", flush=True)

    single_list = SINGLE[:3] if args.quick else SINGLE
    batched_list = BATCHED[:3] if args.quick else BATCHED
    sd1 = layer_stats(SD15, ())
    for name, kernel, over in single_list:
        run("sd15 x1", name, kernel, over, sd1, (), True, 1)
    heavy = layer_stats(SD15, (), seed=3, heavy=True)
    extra = [single_list[i] for i in EXTRA if i < len(single_list)]
    for name, kernel, over in extra:
        run("sd15 x1 heavy", name, kernel, over, heavy, (), True, 1)
    xl = layer_stats(SDXL, ())
    for name, kernel, over in extra:
        run("sdxl x1", name, kernel, over, xl, (), True, 1)
    del xl
    sdb = layer_stats(SD15, (100, 10), seed=1)
    for name, kernel, over in batched_list:
        run("sd15 100x10", name, kernel, over, sdb, (100, 10), False, 1000)
    # CUDA backend in the same run, for comparison
    if "cuda" in mk.available_backends():
        for case, data, lead, graph, per in (("sd15 x1", sd1, (), True, 1), ("sd15 100x10", sdb, (100, 10), False,
                                                                                 1000)):
            outs = empty_outs(mk, data[0], lead)
            fn = functools.partial(mk.memorized_masks, *data, SPARSITY, outs=outs, check_finite=False, backend="cuda")
            t = tt.do_bench_cudagraph(fn, rep=100, quantiles=q) if graph else tt.do_bench(fn, warmup=1, rep=300,
                                                                                           quantiles=q)
            t = [x * 1e3 / per for x in t]
            rows.append({"case": case, "setting": "cuda backend", "median_us": round(t[0], 2),
                         "p20_us": round(t[1], 2), "p80_us": round(t[2], 2), "mismatches": "",
                         "slow_path_problems": "", "refined_problems": "", "programs_per_sm": "", **info})
            print(f"  {case:<18} {'cuda backend':<26} {t[0]:9.1f} us", flush=True)
    write_rows(rows, "mask_stream.csv")
    return 1 if any(r["mismatches"] for r in rows if r["mismatches"] != "") else 0


if __name__ == "__main__":
    sys.exit(main())
