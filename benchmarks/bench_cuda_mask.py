"""memorized_mask on the GPU: the CUDA warp kernel vs the CUDA block kernel vs Triton vs the reference, same run.

Run from the repository root on a CUDA machine with the extension built with MEMLOC_CUDA=1:
    python benchmarks/bench_cuda_mask.py [--quick | --single]
Every configuration is checked against the reference first (single vectors: all layers; batched:
the first 2 subsets). Rows go to $OUT/cuda_mask.csv with GPU, date and commit; the table prints
last. The warp kernel's exact-path count (problems it could not decide on its fast path) is
printed per configuration. ``--quick``: SD1.5 only; ``--single``: SD1.5 single vectors only (for
device calls short of time).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from _masks import SD15, SDXL, empty_outs, layer_stats, mismatches  # noqa: E402
from _meta import git_commit, gpu_name, write_rows  # noqa: E402
from bench_gpu_ops import bench  # noqa: E402

ROWS: list[dict] = []
# (label, backend, environment): MEMLOC_CUDA_MASK=thread|warp|block picks the CUDA kernel (unset:
# the backend's default, the warp kernel where it applies);
# MEMLOC_CUDA_MASK_WARPS sets the warp kernel's rows per block (default 4);
# MEMLOC_CUDA_MASK_WARM=0 turns its warm start off;
# MEMLOC_CUDA_MASK_STREAMS=0 keeps its width groups' launches on the caller's stream;
# MEMLOC_CUDA_MASK_BOUNDS=0 turns its bound path (batched calls) off;
# MEMLOC_CUDA_MASK_MINBLOCKS=2 gives its unstaged (single-vector) launches 128 registers (default 80).
PROVIDERS = [("reference", "reference", {}), ("triton", "triton", {}), ("triton-regs", "triton", {"stream": "regs"}),
             ("triton-regs168", "triton", {"stream": "regs", "maxnreg": 168}),
             ("triton-regs-nocap", "triton", {"stream": "regs", "maxnreg": 0}),
             ("triton-regs-serial", "triton", {"stream": "regs", "serial": 1}),
             ("cuda", "cuda", {}),
             ("cuda-thread", "cuda", {"MEMLOC_CUDA_MASK": "thread"}),
             ("cuda-warp", "cuda", {"MEMLOC_CUDA_MASK": "warp"}),
             ("cuda-warp8", "cuda", {"MEMLOC_CUDA_MASK": "warp", "MEMLOC_CUDA_MASK_WARPS": "8"}),
             ("cuda-warp-cold", "cuda", {"MEMLOC_CUDA_MASK": "warp", "MEMLOC_CUDA_MASK_WARM": "0"}),
             ("cuda-warp-serial", "cuda", {"MEMLOC_CUDA_MASK": "warp", "MEMLOC_CUDA_MASK_STREAMS": "0"}),
             ("cuda-nobounds", "cuda", {"MEMLOC_CUDA_MASK_BOUNDS": "0"}),
             ("cuda-regs128", "cuda", {"MEMLOC_CUDA_MASK_MINBLOCKS": "2"}),
             ("cuda-block", "cuda", {"MEMLOC_CUDA_MASK": "block"})]
KNOBS = ("MEMLOC_CUDA_MASK", "MEMLOC_CUDA_MASK_WARPS", "MEMLOC_CUDA_MASK_WARM", "MEMLOC_CUDA_MASK_STREAMS",
         "MEMLOC_CUDA_MASK_BOUNDS", "MEMLOC_CUDA_MASK_MINBLOCKS")


def run(label, shapes, lead, heavy=False, rep=100):
    import memloc_kernels as mk
    from memloc_kernels.backends.cuda import exact_path_counter, loose_bound_counter
    from memloc_kernels.triton import _config, mask_stream

    weights, sumsqs, nulls = layer_stats(shapes, lead, heavy=heavy)
    per = 1
    for n in lead:
        per *= n
    wbytes = sum(w.numel() * w.element_size() for w in weights)
    counter = exact_path_counter(weights[0].device)
    loose = loose_bound_counter(weights[0].device)
    for name, backend, env in PROVIDERS:
        if backend == "reference" and lead:
            continue  # batched scores do not fit (26 GB per layer for 1000 vectors)
        for knob in KNOBS:
            os.environ.pop(knob, None)
        env = dict(env)
        variant = env.pop("stream", None)  # a Triton streaming-kernel variant (stream_overrides)
        forced = {"variant": variant, **{f: env.pop(f) for f in ("maxnreg", "serial") if f in env}}
        os.environ.update(env)
        ctx = _config.stream_overrides(**forced) if variant else contextlib.nullcontext()
        try:
            with ctx:
                counter.zero_()
                loose.zero_()
                slow = mask_stream.slow_path_counter(weights[0].device)
                slow.zero_()
                bad = 0 if backend == "reference" else mismatches(mk, weights, sumsqs, nulls,
                                                                 subsets=2 if lead else None, backend=backend)
                exact = int(counter.item()) + int(slow.item())
                n_loose = int(loose.item())
                if bad:
                    print(f"  MISMATCH {label} [{name}]: {bad} entries differ", flush=True)
                    continue
                outs = empty_outs(mk, weights, lead)
                fn = functools.partial(mk.memorized_masks, weights, sumsqs, nulls, 0.01, outs=outs, check_finite=False,
                                       backend=backend)
                ms, timing = bench(fn, graph=not lead, rep=rep if backend != "reference" else 30)
                med, p20, p80 = (x * 1e3 / per for x in ms)
                gbps = wbytes / per / (med * 1e-6) / 1e9
                note = f"exact-path problems {exact}" + (f", loose-bound problems {n_loose}" if lead else "")
                ROWS.append({"op": "memorized_mask", "shape": label, "dtype": "float16", "backend": name,
                             "median_us": f"{med:.2f}", "p20_us": f"{p20:.2f}", "p80_us": f"{p80:.2f}",
                             "gbps": f"{gbps:.0f}", "gpu": gpu_name(), "date": _date(), "commit": git_commit(),
                             "timing": timing + (", per vector" if lead else ""), "note": note})
                print(f"  {label:<28} {name:<17} {med:9.2f} us  (p20 {p20:.2f}, p80 {p80:.2f})  {note}", flush=True)
        except Exception as exc:  # one provider failing must not stop the others
            print(f"  ERROR {label} [{name}]: {type(exc).__name__}: {exc}", flush=True)
        finally:
            for knob in KNOBS:
                os.environ.pop(knob, None)


def _date() -> str:
    import datetime

    return datetime.datetime.now().isoformat(timespec="seconds")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 only")
    parser.add_argument("--single", action="store_true", help="SD1.5 single vectors only")
    parser.add_argument("--only", default="", help="comma-separated provider labels to run (default: all)")
    args = parser.parse_args()
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {label for label, _, _ in PROVIDERS}
        if unknown:
            parser.error(f"unknown provider(s): {', '.join(sorted(unknown))}")
        PROVIDERS[:] = [p for p in PROVIDERS if p[0] in keep]
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    print(f"{gpu_name()}  torch {torch.__version__}  commit {git_commit()}", flush=True)
    run("sd15 x1", SD15, ())
    run("sd15 x1 heavy", SD15, (), heavy=True)
    if not args.single:
        run("sd15 100x10", SD15, (100, 10), rep=200)
    if not (args.quick or args.single):
        run("sd15 100x10 heavy", SD15, (100, 10), heavy=True, rep=200)
        run("sdxl x1", SDXL, ())
        run("sdxl 10x10", SDXL, (10, 10), rep=200)
    write_rows(ROWS, "cuda_mask.csv")
    print(f"\n{'shape':<28} {'backend':<17} {'median_us':>10} {'p20':>9} {'p80':>9} {'GB/s':>6}  note")
    for r in ROWS:
        print(f"{r['shape']:<28} {r['backend']:<17} {r['median_us']:>10} {r['p20_us']:>9} {r['p80_us']:>9} "
              f"{r['gbps']:>6}  {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
