"""GPU benchmark of the memloc ops for every available backend, checked against the reference first.

Run from the repository root on a CUDA machine:  python benchmarks/bench_gpu_ops.py
Writes $OUT/gpu_ops.csv (./bench_out/gpu_ops.csv when OUT is unset) and prints a table last.
Each configuration is verified (masks identical to the reference, GEGLU bit-exact, IoU exact)
before it is timed; a failure prints MISMATCH and the run goes on. One failing provider or
configuration never stops the run. Budget: under 4 minutes.

Timing: triton.testing.do_bench (median, p20, p80 of many runs). Ops whose single call is
launch-bound (one (subset, timestep) of memorized_masks: ~20 kernels and Python glue) are
timed inside a CUDA graph (do_bench_cudagraph), which measures GPU time only; the 'timing'
column says which. Bandwidths are compared with a device-to-device copy measured in this run.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402
from _masks import SD15, SDXL, layer_stats  # noqa: E402
from _meta import git_commit, gpu_name  # noqa: E402

DEVICE = "cuda"
BUDGET_S = 225.0
T0 = time.monotonic()
ROWS: list[dict] = []
FAILURES: list[str] = []

IOU_CHECK = (24, 1 << 18)  # masks x words of the exactness check before timing mask_iou
APPLY_SHAPE = (60 * 1280, 5120)  # all 60 SDXL 1280 x 5120 layers as one matrix
STATS_SHAPES = ((4096, 1280), (1024, 2560), (256, 5120))  # SD1.5 (tokens, d_ff) per UNet level


def left() -> float:
    return BUDGET_S - (time.monotonic() - T0)


META = {"gpu": "", "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit()}


def record(op, shape, dtype, backend, ms, nbytes=None, per=1, timing="", note=""):
    """One CSV row; ``ms`` is (median, p20, p80) per call, divided by ``per`` (amortized)."""
    med, p20, p80 = (x * 1e3 / per for x in ms)
    gbps = (nbytes / per) / (med * 1e-6) / 1e9 if nbytes else ""
    ROWS.append({"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                 "median_us": f"{med:.2f}", "p20_us": f"{p20:.2f}", "p80_us": f"{p80:.2f}",
                 "gbps": f"{gbps:.0f}" if gbps != "" else "", **META, "timing": timing, "note": note})
    rate = f"{gbps:.0f} GB/s" if gbps != "" else ""
    print(f"  {op:<22} {backend:<22} {med:>11.2f} us  {rate}  {note}", flush=True)


def bench(fn, graph=False, rep=100):
    """(median, p20, p80) ms of ``fn``; in a CUDA graph when asked and possible."""
    import triton.testing as tt

    q = [0.5, 0.2, 0.8]
    if graph:
        try:
            fn()
            torch.cuda.synchronize()
            return tt.do_bench_cudagraph(fn, rep=rep, quantiles=q), "cudagraph"
        except Exception as exc:  # capture can fail (a sync, an allocation policy): fall back
            print(f"    (CUDA graph failed: {type(exc).__name__}: {str(exc)[:120]}; timing eagerly)")
            torch.cuda.synchronize()
    return tt.do_bench(fn, warmup=25, rep=rep, quantiles=q), "eager"


def guarded(name):
    """Run a benchmark section; report and continue on any error; skip when out of time."""
    def wrap(fn):
        def run(*args, **kwargs):
            if left() < 5:
                print(f"[skip] {name}: time budget spent")
                FAILURES.append(f"{name}: skipped (time budget)")
                return None
            print(f"[{name}] ({left():.0f} s left)", flush=True)
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                FAILURES.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  ERROR in {name}: {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=3)
                torch.cuda.synchronize()
                return None
        return run
    return wrap


def mismatch(what: str) -> None:
    msg = f"MISMATCH: {what}"
    FAILURES.append(msg)
    print("!" * 80 + f"\n!!! {msg}\n" + "!" * 80, flush=True)


def providers(mk, op: str) -> list[str]:
    from memloc_kernels._dispatch import get_backend

    names = []
    for name in ("reference", "triton", "cuda"):
        backend = get_backend(name)
        ok, _ = backend.availability()
        if ok and backend.supports(torch.device(DEVICE)) and hasattr(backend, op):
            names.append(name)
    return names


def verify_masks(mk, backend, weights, sumsqs, nulls, sparsity, what) -> bool:
    from memloc_kernels import reference as ref

    got = mk.memorized_masks(weights, sumsqs, nulls, sparsity, check_finite=False, backend=backend)
    for i, (w, s, n) in enumerate(zip(weights, sumsqs, nulls)):
        want = ref.memorized_mask(w, s, n, sparsity)
        bad = int((mk.unpack_mask(got[i]) != want).sum())
        if bad:
            mismatch(f"{what} [{backend}] layer {i} {tuple(w.shape)}: {bad} entries differ")
            return False
    return True


# ------------------------------------------------------------------------------------------ sections


@guarded("copy bandwidth")
def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms, timing = bench(functools.partial(dst.copy_, src))
    record("copy", "1 GiB", torch.uint8, "torch", ms, nbytes=2 * src.numel(), timing=timing,
           note="bytes read + written")
    return 2 * src.numel() / (ms[0] * 1e-3) / 1e9


@guarded("memorized_mask single")
def mask_single(mk, shapes, label, sparsity=0.01):
    weights, sumsqs, nulls = layer_stats(shapes, ())
    wbytes = sum(w.numel() * 2 for w in weights)
    for backend in providers(mk, "memorized_mask"):
        if backend != "reference" and not verify_masks(mk, backend, weights, sumsqs, nulls, sparsity, label):
            continue
        outs = [mk.PackedMask(torch.zeros(w.shape[0], mk.n_words(w.shape[1]), dtype=torch.int32, device=DEVICE),
                              w.shape[1]) for w in weights]
        fn = functools.partial(mk.memorized_masks, weights, sumsqs, nulls, sparsity, outs=outs, check_finite=False,
                               backend=backend)
        ms, timing = bench(fn, graph=True, rep=50 if backend == "reference" else 100)
        record("memorized_mask", f"{label} x1", torch.float16, backend, ms, nbytes=wbytes, timing=timing,
               note="target <= 50 us" if label == "sd15" else "")


@guarded("memorized_mask batched")
def mask_batched(mk, s=100, t=10, sparsity=0.01):
    from memloc_kernels import reference as ref

    weights, sumsqs, nulls = layer_stats(SD15, (s, t))
    wbytes = sum(w.numel() * 2 for w in weights)
    for backend in providers(mk, "memorized_mask"):
        if backend == "reference":
            continue  # scores of 1000 vectors do not fit (26 GB per layer); see the single row x 1000
        outs = [mk.PackedMask(torch.zeros(s, w.shape[0], mk.n_words(w.shape[1]), dtype=torch.int32, device=DEVICE),
                              w.shape[1]) for w in weights]
        mk.memorized_masks(weights, sumsqs, nulls, sparsity, outs=outs, check_finite=False, backend=backend)
        # the first 2 subsets (all 10 timesteps) against the reference
        for i, (w, ss, n) in enumerate(zip(weights, sumsqs, nulls)):
            want = ref.memorized_mask(w, ss[:2], n, sparsity)
            bad = int((mk.unpack_mask(outs[i][:2]) != want).sum())
            if bad:
                mismatch(f"batched [{backend}] layer {i}: {bad} entries differ")
                break
        else:
            fn = functools.partial(mk.memorized_masks, weights, sumsqs, nulls, sparsity, outs=outs,
                                   check_finite=False, backend=backend)
            ms, timing = bench(fn, rep=200)
            record("memorized_mask", f"sd15 {s}x{t}", torch.float16, backend, ms, nbytes=wbytes, per=s * t,
                   timing=timing + ", per vector", note="target <= 25 us")


@guarded("memorized_mask tuning sweep")
@guarded("mask_iou")
def iou(mk, n=1000):
    words_per_mask = sum(o * i for o, i in SD15) // 32
    # exactness first, on a smaller problem, against float matmuls of the unpacked bits
    small = torch.randint(-2**31, 2**31 - 1, IOU_CHECK, dtype=torch.int32, device=DEVICE)
    from memloc_kernels import reference as ref

    bits = ref.unpack_mask(small, small.shape[1] * 32).to(torch.float32)
    want = (bits @ bits.T).round().to(torch.int64)
    del bits
    for backend in providers(mk, "mask_intersections"):
        if backend == "reference":
            continue  # would unpack 1000 x 49.6 M bits into float64 (400 GB)
        from memloc_kernels._dispatch import get_backend

        got = get_backend(backend).mask_intersections(small)
        if not torch.equal(got, want):
            mismatch(f"mask_intersections [{backend}]: {int((got != want).sum())} entries differ")
            continue
        words = torch.randint(-2**31, 2**31 - 1, (n, words_per_mask), dtype=torch.int32, device=DEVICE)
        masks = mk.PackedMask(words, words_per_mask * 32)
        ms, timing = bench(functools.partial(mk.mask_iou, masks, backend=backend), rep=1)
        record("mask_iou", f"{n} x sd15 (49.6M bits)", "packed", backend, ms, nbytes=words.numel() * 4,
               timing=timing, note="target <= 0.5 s")
        del words, masks
        torch.cuda.empty_cache()


@guarded("apply_mask / restore")
def apply_restore(mk, copy_gbps):
    from memloc_kernels import reference as ref

    # big enough that the count sync is noise
    w0 = torch.randn(APPLY_SHAPE, device=DEVICE, dtype=torch.float16)
    mask = torch.rand(w0.shape, device=DEVICE) < 0.01
    packed = mk.pack_mask(mask)
    dense_bytes = 2 * w0.numel() * 2 + packed.words.numel() * 4  # W read + written, words read
    for backend in providers(mk, "apply_mask"):
        if backend == "reference" and left() < 60:
            continue
        w = w0.clone()
        rec = mk.apply_mask(w, packed, backend=backend)
        expected = w0.clone()
        removed = ref.apply_mask(expected, mask)
        if not (torch.equal(w, expected) and torch.equal(rec.removed, removed)):
            mismatch(f"apply_mask [{backend}]")
            continue
        mk.restore(w, rec, backend=backend)
        if not torch.equal(w.view(torch.int16), w0.view(torch.int16)):
            mismatch(f"restore [{backend}]")
            continue
        ms, timing = bench(functools.partial(mk.apply_mask, w, packed, backend=backend))
        gbps = dense_bytes / (ms[0] * 1e-3) / 1e9
        note = (f"{100 * gbps / copy_gbps:.0f}% of copy; bytes = dense W read+write + words; target >= 70%"
                if copy_gbps else "")
        shape = f"{APPLY_SHAPE[0]}x{APPLY_SHAPE[1]} 1%"
        record("apply_mask", shape, torch.float16, backend, ms, nbytes=dense_bytes, timing=timing,
               note=note)
        ms, timing = bench(functools.partial(mk.restore, w, rec, backend=backend))
        record("restore", shape, torch.float16, backend, ms, nbytes=dense_bytes, timing=timing)
        del w, rec
    del w0, mask, packed
    torch.cuda.empty_cache()


def _geglu_then_hook(proj_out, batch, tokens, d):
    """What a PyTorch forward hook adds to diffusers' GEGLU: a float32 sum of squares per sample."""
    from memloc_kernels import reference as ref

    h = ref.geglu(proj_out)
    h.float().pow(2).reshape(batch, tokens, d).sum(dim=1)
    return h


@guarded("statistics (GEGLU + sums of squares)")
def statistics(mk, batch=32):
    from memloc_kernels import reference as ref

    for tokens, d in STATS_SHAPES:
        if left() < 20:
            break
        proj_out = torch.randn(batch * tokens, 2 * d, device=DEVICE, dtype=torch.float16)
        rows = batch * tokens
        shape = f"{batch}x{tokens}x{d}"
        io_bytes = proj_out.numel() * 2 + rows * d * 2
        ms, timing = bench(functools.partial(ref.geglu, proj_out))
        record("geglu plain", shape, torch.float16, "torch", ms, nbytes=io_bytes, timing=timing,
               note="diffusers' two lines, no statistics")

        ms, timing = bench(functools.partial(_geglu_then_hook, proj_out, batch, tokens, d))
        record("geglu + hook sumsq", shape, torch.float16, "torch", ms, nbytes=io_bytes, timing=timing)
        acc = torch.zeros(batch, d, device=DEVICE)
        for backend in providers(mk, "geglu_sumsq"):
            if backend == "reference":
                continue  # the same as the hook row above
            h = mk.geglu_sumsq(proj_out, acc, group_size=tokens, backend=backend)
            if not torch.equal(h, ref.geglu(proj_out)):
                mismatch(f"geglu_sumsq [{backend}] output differs from diffusers' GEGLU")
                continue
            ms, timing = bench(functools.partial(mk.geglu_sumsq, proj_out, acc, group_size=tokens, backend=backend))
            record("geglu_sumsq", shape, torch.float16, backend, ms, nbytes=io_bytes, timing=timing)
        h = ref.geglu(proj_out)
        for backend in providers(mk, "accumulate_sumsq"):
            ms, timing = bench(functools.partial(mk.accumulate_sumsq, h, acc, group_size=tokens, backend=backend))
            record("accumulate_sumsq", shape, torch.float16, backend, ms, nbytes=h.numel() * 2, timing=timing)
        del proj_out, h
        torch.cuda.empty_cache()


@guarded("UNet forward with statistics")
def unet_forward(mk, batch=32):
    """SD1.5-config UNet (random weights, fp16, 64x64 latents): plain vs with fused GEGLU statistics."""
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.models.activations import GEGLU
    except Exception as exc:
        print(f"  skipped: diffusers does not import ({type(exc).__name__})")
        return
    with torch.device(DEVICE):  # initialize on the GPU: much faster than on the CPU
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ).to(torch.float16).eval()
    x = torch.randn(batch, 4, 64, 64, device=DEVICE, dtype=torch.float16)
    ctx = torch.randn(batch, 77, 768, device=DEVICE, dtype=torch.float16)
    tstep = torch.tensor([500] * batch, device=DEVICE)
    gegl = [m for m in unet.modules() if isinstance(m, GEGLU)]
    accs = {id(m): None for m in gegl}

    def fused_forward(self, hidden_states, *args, **kwargs):
        proj_out = self.proj(hidden_states)
        d = proj_out.shape[-1] // 2
        acc = accs[id(self)]
        if acc is None or acc.shape != (proj_out.shape[0], d):
            acc = accs[id(self)] = torch.zeros(proj_out.shape[0], d, device=proj_out.device)
        return mk.geglu_sumsq(proj_out, acc, group_size=proj_out.shape[1], backend="triton")

    with torch.inference_mode():
        forward = functools.partial(unet, x, tstep, ctx)
        ms_plain, timing = bench(forward, rep=1000)
        record("unet forward", f"sd15 b{batch} 64x64", torch.float16, "plain", ms_plain, timing=timing)
        if "triton" in providers(mk, "geglu_sumsq"):
            originals = {id(m): m.forward for m in gegl}
            for m in gegl:
                m.forward = fused_forward.__get__(m)
            try:
                ms, timing = bench(forward, rep=1000)
            finally:
                for m in gegl:
                    m.forward = originals[id(m)]
            record("unet forward", f"sd15 b{batch} 64x64", torch.float16, "triton stats", ms, timing=timing,
                   note=f"{ms[0] / ms_plain[0]:.3f}x plain (target <= 1.02x), {len(gegl)} GEGLUs")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    META["gpu"] = gpu_name()
    import memloc_kernels as mk
    from memloc_kernels import available_backends

    print(f"{META['gpu']}  torch {torch.__version__}  backends: {', '.join(available_backends())}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception:
        pass
    copy_gbps = copy_bandwidth()
    mask_single(mk, SD15, "sd15")
    mask_batched(mk)
    mask_single(mk, SDXL, "sdxl")
    iou(mk)
    apply_restore(mk, copy_gbps)
    statistics(mk)
    unet_forward(mk)
    # the tile kernel's launch sweep (its 2026-11-29 rows) moved to history; the streaming kernel's
    # settings are swept by benchmarks/bench_mask_stream.py
    write_csv()
    print_table()
    return 0


def write_csv() -> None:
    from memloc.io import atomic_path

    out_dir = Path(os.environ.get("OUT") or ROOT / "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_ops.csv"
    fields = ["op", "shape", "dtype", "backend", "median_us", "p20_us", "p80_us", "gbps", "gpu", "date", "commit",
              "timing", "note"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(ROWS)
    print(f"\nwrote {len(ROWS)} rows to {path}")


def print_table() -> None:
    print(f"\n{'op':<22} {'shape':<24} {'backend':<24} {'median_us':>11} {'p20':>10} {'p80':>10} {'GB/s':>6}  note")
    for r in ROWS:
        print(f"{r['op']:<22} {r['shape']:<24} {r['backend']:<24} {r['median_us']:>11} {r['p20_us']:>10} "
              f"{r['p80_us']:>10} {r['gbps']:>6}  {r['note']}")
    if FAILURES:
        print("\nPROBLEMS:")
        for f in FAILURES:
            print(f"  {f}")
    print(f"\ntotal {time.monotonic() - T0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
