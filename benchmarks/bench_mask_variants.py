"""Compare the triton memorized_mask variants (fallback inline/deferred, register cap) on SD1.5 shapes.

Run from the repository root on a CUDA machine:  python benchmarks/bench_mask_variants.py [--maxnreg128]
For each variant: masks checked against the reference (single vector: all 16 layers; batched: the
first 2 subsets of every layer), then median/p20/p80 us of one (subset, timestep) (CUDA graph) and
per vector of a 20 x 10 batch, and the programs per SM that the compiled kernel's registers allow.
Writes $OUT/mask_variants.csv when OUT is set. About 40-60 s, most of it Triton compilation.
See docs/TRITON_MASK_NOTES.md.
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
from _masks import SD15, SPARSITY, empty_outs, layer_stats, mismatches  # noqa: E402
from _meta import write_rows  # noqa: E402

VARIANTS = {
    "inline (current)": {"fallback": "inline"},
    "deferred": {"fallback": "deferred"},
    "deferred+maxnreg168": {"fallback": "deferred", "maxnreg": 168},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maxnreg128", action="store_true", help="also try deferred + a 128-register cap")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    import triton
    import triton.testing as tt

    import memloc_kernels as mk
    from memloc_kernels.triton import _config
    from memloc_kernels.triton import mask as mask_mod

    variants = dict(VARIANTS)
    if args.maxnreg128:
        variants["deferred+maxnreg128"] = {"fallback": "deferred", "maxnreg": 128}
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    single = layer_stats(SD15, ())
    batched = layer_stats(SD15, (20, 10), seed=1)
    q = [0.5, 0.2, 0.8]
    rows = []
    for name, over in variants.items():
        with _config.mask_overrides(**over):
            before = set(mask_mod._OCCUPANCY)
            bad = mismatches(mk, *single) + mismatches(mk, *batched, subsets=2)
            occ = sorted((key[1], per_sm) for key, per_sm in mask_mod._OCCUPANCY.items() if key not in before)
            out1, outb = empty_outs(mk, single[0], ()), empty_outs(mk, batched[0], (20, 10))
            f1 = functools.partial(mk.memorized_masks, *single, SPARSITY, outs=out1, check_finite=False,
                                   backend="triton")
            fb = functools.partial(mk.memorized_masks, *batched, SPARSITY, outs=outb, check_finite=False,
                                   backend="triton")
            f1()
            torch.cuda.synchronize()
            t1 = tt.do_bench_cudagraph(f1, rep=100, quantiles=q)
            tb = [x * 1e3 / 200 for x in tt.do_bench(fb, warmup=1, rep=300, quantiles=q)]
        t1 = [x * 1e3 for x in t1]
        programs = " ".join(f"{d}:{p}" for d, p in occ)
        rows.append({"variant": name, "single_us": t1[0], "single_p20": t1[1], "single_p80": t1[2],
                     "batched_us_per_vector": tb[0], "batched_p20": tb[1], "batched_p80": tb[2],
                     "mismatches": bad, "programs_per_sm": programs})
        print(f"  {name:<22} single {t1[0]:8.1f} us   batched {tb[0]:7.1f} us/vector   "
              f"mismatches {bad}   programs/SM (d_in:n) {programs}", flush=True)
    print(f"\n{'variant':<24}{'single us':>11}{'p20':>9}{'p80':>9}{'batch us/vec':>14}{'p20':>9}{'p80':>9}"
          f"{'bad':>6}  programs/SM")
    for r in rows:
        print(f"{r['variant']:<24}{r['single_us']:>11.1f}{r['single_p20']:>9.1f}{r['single_p80']:>9.1f}"
              f"{r['batched_us_per_vector']:>14.1f}{r['batched_p20']:>9.1f}{r['batched_p80']:>9.1f}"
              f"{r['mismatches']:>6}  {r['programs_per_sm']}")
    write_rows(rows, "mask_variants.csv")
    return 1 if any(r["mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
