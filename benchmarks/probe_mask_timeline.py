"""Where a single-vector memorized_mask call spends its time: every GPU kernel of the call, from a
CUDA-graph replay under torch.profiler (CUPTI), with its duration and start relative to the call's
first kernel. Run from the repository root on a CUDA machine with the extension built:
    python benchmarks/probe_mask_timeline.py [--batched] [--reps 20]
Knobs (MEMLOC_CUDA_MASK_*) are read from the environment as usual. Prints one line per kernel
(median over the replays) and the span of the whole call; writes $OUT/mask_timeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from _masks import SD15, empty_outs, layer_stats  # noqa: E402
from _meta import git_commit, gpu_name  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batched", action="store_true", help="100 x 10 vectors instead of one")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        return 1
    import memloc_kernels as mk

    lead = (100, 10) if args.batched else ()
    weights, sumsqs, nulls = layer_stats(SD15, lead)
    outs = empty_outs(mk, weights, lead)

    def call():
        mk.memorized_masks(weights, sumsqs, nulls, 0.01, outs=outs, check_finite=False, backend="cuda")

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            graph.replay()
            torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    # split into replays: a gap of more than 20 us between kernels starts a new one
    calls, cur, last_end = [], [], None
    for e in events:
        if last_end is not None and e.time_range.start - last_end > 20:
            calls.append(cur)
            cur = []
        cur.append(e)
        last_end = max(last_end or 0, e.time_range.end)
    if cur:
        calls.append(cur)
    per_kernel: dict[str, list[tuple[float, float]]] = {}
    spans = []
    for c in calls:
        t0 = c[0].time_range.start
        spans.append(max(e.time_range.end for e in c) - t0)
        for i, e in enumerate(c):
            per_kernel.setdefault(f"{i:02d} {e.name[:90]}", []).append((e.time_range.start - t0,
                                                                        e.time_range.end - e.time_range.start))
    print(f"{gpu_name()}  torch {torch.__version__}  commit {git_commit()}  "
          f"{'batched 100x10' if args.batched else 'single vector'}  {len(calls)} replays")
    rows = []
    for name, v in sorted(per_kernel.items()):
        start = statistics.median(s for s, _ in v)
        dur = statistics.median(d for _, d in v)
        rows.append({"kernel": name, "start_us": start, "duration_us": dur, "n": len(v)})
        print(f"  start {start:8.2f} us  duration {dur:8.2f} us  x{len(v):<3} {name}")
    span = statistics.median(spans)
    print(f"  call span (first kernel start to last end), median: {span:.2f} us")
    out = Path(os.environ.get("OUT", ".")) / "mask_timeline.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpu": gpu_name(), "commit": git_commit(), "batched": args.batched,
                               "env": {k: v for k, v in os.environ.items() if k.startswith("MEMLOC_CUDA")},
                               "span_us": span, "kernels": rows}, indent=1))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
