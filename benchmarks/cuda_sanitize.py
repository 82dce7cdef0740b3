"""Runs every op of the cuda backend once at small sizes and checks it, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/cuda_sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_sanitize.py
    compute-sanitizer --tool synccheck python benchmarks/cuda_sanitize.py
    python benchmarks/cuda_sanitize.py --time    # (no sanitizer) median times at SD1.5 sizes

``--time`` instead times the issue's target cases with CUDA events (median of 20 after warm-up)
for the cuda, triton (when available) and reference backends, and prints one line per case.

Without torch's caching allocator every tensor is its own allocation, so memcheck sees an access
one past a tensor's end. The sizes are chosen to reach every code path (the filter and the
exact fallback of memorized_mask, padded warps, several layers per launch, chunked sums, both
intersection tile sizes, split word ranges) while staying fast under the sanitizer. Exit status 1
if any result differs from the reference.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

import memloc_kernels as mk  # noqa: E402
from memloc_kernels import reference as ref  # noqa: E402
from memloc_kernels._dispatch import get_backend  # noqa: E402


def _stats(d_in: int, *lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.rand(*lead, d_in, device="cuda") * 10, torch.rand(*lead, d_in, device="cuda") * 10)


def _check(name: str, ok: bool, failures: list[str]) -> None:
    torch.cuda.synchronize()  # surface asynchronous kernel errors here, under this op's name
    print(f"{name:48s} {'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        failures.append(name)


SD15_LAYERS = [(320, 1280)] * 5 + [(640, 2560)] * 5 + [(1280, 5120)] * 6


def _ms_per_call(fn, reps: int = 20) -> float:
    """GPU time per call: ``reps`` calls back to back between two events, median of 3 such runs.

    Back to back, the host enqueues ahead of the GPU when a call's GPU work outlasts its launch
    overhead (batched cases); for short calls the figure includes that overhead.
    """
    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / reps)
    return sorted(runs)[1]


def _mask_layers(impl, weights, sumsqs, null_sumsqs, ks, outs) -> None:
    if hasattr(impl, "memorized_mask_multi"):
        impl.memorized_mask_multi(weights, sumsqs, null_sumsqs, ks, outs)
    else:
        for layer in zip(weights, sumsqs, null_sumsqs, ks, outs):
            impl.memorized_mask(*layer)


def time_targets() -> None:
    """GPU time per call of the issue's target cases, per backend (backend-level calls: no ops-API checks)."""
    backends = [b for b in ("cuda", "triton", "reference") if get_backend(b).availability()[0]]
    weights = [(torch.randn(s, device="cuda") * 0.02).half() for s in SD15_LAYERS]
    ks = [mk.topk_count(0.01, s[1]) for s in SD15_LAYERS]
    for S, T, target in [(1, 1, "<= 0.050 ms"), (100, 10, "<= 0.025 ms per vector")]:
        stats = [_stats(s[1], S, T) for s in SD15_LAYERS]
        outs = [torch.zeros(S, s[0], (s[1] + 31) // 32, dtype=torch.int32, device="cuda") for s in SD15_LAYERS]
        args = ([a for a, _ in stats], [b for _, b in stats], ks, outs)
        for b in backends:
            if b == "reference" and S > 1:
                continue  # minutes; the single-vector line is the reference's figure
            ms = _ms_per_call(partial(_mask_layers, get_backend(b), weights, *args), reps=20 if S == 1 else 3)
            print(f"memorized_mask SD1.5 16 layers S={S} T={T} {b:9s} {ms:9.3f} ms  {ms / (S * T):8.4f} ms/vector"
                  f"  (target {target})")  # fmt: skip
    words = torch.randint(-(2**31), 2**31 - 1, (1000, 49_561_600 // 32), dtype=torch.int32, device="cuda")
    for b in [b for b in backends if b != "reference"]:
        ms = _ms_per_call(partial(get_backend(b).mask_intersections, words), reps=2)
        print(f"mask_intersections 1000 SD1.5 masks {b:9s} {ms:9.1f} ms  (target <= 500 ms)")
    del words
    h = torch.randn(32 * 4096, 1280, device="cuda").half()
    acc = torch.zeros(32, 1280, device="cuda")
    for b in backends:
        ms = _ms_per_call(partial(get_backend(b).accumulate_sumsq, h, acc, 4096))
        print(f"accumulate_sumsq 32x4096x1280 fp16 {b:9s} {ms:9.3f} ms  {h.numel() * 2 / ms / 1e6:7.0f} GB/s read")
    weight = torch.randn(1280, 5120, device="cuda").half()
    words = mk.pack_mask(torch.rand(1280, 5120, device="cuda") < 0.01).words

    def apply_restore(impl) -> None:
        impl.restore(weight, words, impl.apply_mask(weight, words))

    for b in backends:
        ms = _ms_per_call(partial(apply_restore, get_backend(b)))
        print(f"apply_mask + restore 1280x5120 fp16 1% {b:9s} {ms:9.3f} ms  (each syncs once for the count)")


def main() -> int:
    ok, why = get_backend("cuda").availability()
    if not ok:
        print(f"cuda backend unavailable: {why}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if "--time" in sys.argv[1:]:
        time_targets()
        return 0
    failures: list[str] = []
    cuda = get_backend("cuda")

    for shape, sparsity, lead, label in [
        ((3, 1280), 0.01, (2, 2), "filter path, E=20"),
        ((2, 5120), 0.01, (1, 1), "filter path, E=32"),
        ((2, 5120), 0.05, (1, 2), "exact fallback (large k)"),
        ((3, 7), 0.5, (2, 1), "d_in < 32"),
        ((2, 4097), 0.01, (1, 1), "padded last warp"),
        ((4, 100), 1.0, (1, 1), "k = d_in"),
    ]:
        weight = torch.randn(shape, device="cuda").half()
        sumsq, null_sumsq = _stats(shape[1], *lead)
        got = mk.memorized_mask(weight, sumsq, null_sumsq, sparsity, packed=True, backend="cuda")
        expected = ref.pack_mask(ref.memorized_mask(weight, sumsq, null_sumsq, sparsity).reshape(-1, shape[1]))
        _check(f"memorized_mask {label}", torch.equal(got.words.reshape(expected.shape), expected), failures)

    weight = torch.zeros(4, 640, device="cuda").half()
    weight[:, ::5] = 1  # 128 equal scores per row: ties at the k-th score
    sumsq = torch.ones(1, 1, 640, device="cuda")
    got = mk.memorized_mask(weight, sumsq, torch.zeros_like(sumsq), 0.01, packed=True, backend="cuda")
    expected = ref.pack_mask(ref.memorized_mask(weight, sumsq, torch.zeros_like(sumsq), 0.01).reshape(-1, 640))
    _check("memorized_mask planted ties", torch.equal(got.words.reshape(expected.shape), expected), failures)

    shapes = [(4, 96)] * 66 + [(3, 1280), (2, 2560)]  # 66 layers of one class: two launches
    weights = [torch.randn(s, device="cuda").half() for s in shapes]
    stats = [_stats(s[1], 2, 1) for s in shapes]
    got = mk.memorized_masks(weights, [a for a, _ in stats], [b for _, b in stats], 0.05, backend="cuda")
    same = all(
        torch.equal(g.words, ref.pack_mask(ref.memorized_mask(w, a, b, 0.05).reshape(-1, w.shape[1])).view_as(g.words))
        for g, w, (a, b) in zip(got, weights, stats)
    )
    _check("memorized_masks 68 layers", same, failures)

    for rows, d_in, group_size in [(7, 33, None), (600, 257, 300)]:
        h = torch.randn(rows, d_in, device="cuda").half()
        groups = 1 if group_size is None else rows // group_size
        acc = torch.zeros(groups, d_in, device="cuda")
        mk.accumulate_sumsq(h, acc[0] if group_size is None else acc, group_size=group_size, backend="cuda")
        expected = h.double().square().reshape(groups, -1, d_in).sum(dim=1)
        _check(f"accumulate_sumsq {rows}x{d_in} g{group_size}", torch.allclose(acc.double(), expected, rtol=1e-5),
               failures)  # fmt: skip

    for dtype in (torch.float16, torch.float32, torch.float64):
        weight = torch.randn(5, 37, device="cuda").to(dtype)
        original = weight.clone()
        mask = torch.rand(5, 37, device="cuda") < 0.3
        record = mk.apply_mask(weight, mask, backend="cuda")
        pruned_ok = torch.equal(record.removed, original[mask]) and bool((weight[mask] == 0).all())
        mk.restore(weight, record, backend="cuda")
        _check(f"apply_mask/restore {dtype}", pruned_ok and torch.equal(weight, original), failures)

    mask = torch.rand(6, 45, device="cuda") < 0.5
    words = cuda.pack_mask(mask)
    _check("pack/unpack", torch.equal(words, ref.pack_mask(mask)) and torch.equal(cuda.unpack_mask(words, 45), mask),
           failures)  # fmt: skip

    for n, w in [(3, 5), (70, 33), (2, 20_000)]:
        words = torch.randint(-(2**31), 2**31 - 1, (n, w), dtype=torch.int32, device="cuda")
        reference = get_backend("reference")
        same = torch.equal(cuda.mask_popcount(words), reference.mask_popcount(words)) and torch.equal(
            cuda.mask_intersections(words), reference.mask_intersections(words)
        )
        _check(f"mask_popcount/intersections {n}x{w}", same, failures)

    if failures:
        print(f"{len(failures)} mismatches: {', '.join(failures)}", file=sys.stderr)
        return 1
    print("all ops ran and matched the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
