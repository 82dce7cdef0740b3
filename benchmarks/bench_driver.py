"""Driver benchmark: memloc collect + localize on an SD1.5-shaped pipeline against forward-only and hooks.

The paper's experiment at Stable Diffusion 1.5 shapes with random fp16 weights (512x512, the
50-step PNDM schedule of SD1.5, guidance 7.5): 10 subsets x 10 prompts of
``../shared/data/sdv1_500_memorized.jsonl``, tau = 10, s = 1%. Timed (wall clock, CUDA synced):

* memloc: ``collect_statistics`` (batched CFG, first tau+1 steps, fused GEGLU statistics, stats file
  written) + ``localize`` of the 10 subsets (stats file read, masks of eq. 5-7, mask file written);
* (a) the same UNet forward passes (same batches, same tau+1 steps) without statistics;
* (b) a hook-based batched PyTorch implementation (driver_hook_baseline.py): one batch per subset,
  forward pre-hooks adding ``h.float().pow(2).sum``, ``torch.topk`` localization;
* the sweep: masks of 1,000 further 10-prompt subsets from the stored statistics (target <= 1 s).

Targets: memloc within 1.05x of (a) and faster than (b); the sweep within 1 s. Needs a CUDA GPU,
diffusers and transformers. Run from the repository root::

    python benchmarks/bench_driver.py [--batch-size 10] [--repeats 2]

Prints a table; with $OUT set, writes $OUT/bench_driver.csv (commit: $MEMLOC_COMMIT when the tree has no .git).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "python"), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from _meta import git_commit, gpu_name  # noqa: E402

SD15_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def build_sd15(tokenizer_dir: Path, device: str, dtype: torch.dtype):
    """StableDiffusionPipeline with SD1.5's configuration and random weights (built on the GPU: fast)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=SD15_DOWN, up_block_types=SD15_UP, layers_per_block=2,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def forward_only(runner, prompts, seeds, batch) -> float:
    start = synced()
    for i in range(0, len(prompts), batch):
        runner.run(prompts[i : i + batch], seeds[i : i + batch])
    return synced() - start


def memloc_run(pipe, prompts, subsets, args, workdir: Path) -> tuple[float, float, Path, Path]:
    from memloc.api import collect_statistics, localize

    stats, mask = workdir / "stats.safetensors", workdir / "mask.safetensors"
    start = synced()
    collect_statistics(prompts, stats, pipe=pipe, batch_size=args.batch_size, steps=args.steps, timesteps=args.tau,
                       guidance_scale=7.5, seed=0, backend=args.backend, restart=True, progress=False)
    collected = synced()
    localize(stats, mask, sparsity=args.sparsity, subsets=subsets, denoiser=pipe.unet, backend=args.backend,
             progress=False)
    return collected - start, synced() - collected, stats, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--subset-size", type=int, default=10)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10, help="prompts per memloc/forward-only batch")
    parser.add_argument("--sweep", type=int, default=1000, help="subsets in the sweep from stored statistics")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each provider (the best is kept)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of this script on a tiny pipeline (figures meaningless)")
    args = parser.parse_args()

    if not (torch.cuda.is_available() or args.smoke):
        print("bench_driver: needs a CUDA GPU", file=sys.stderr)
        return 1
    missing = [m for m in ("diffusers", "transformers") if __import__("importlib").util.find_spec(m) is None]
    if missing:
        print(f"bench_driver: install {', '.join(missing)} first", file=sys.stderr)
        return 1
    from driver_hook_baseline import run_baseline

    import memloc_kernels as mk
    from memloc.api import SubsetStatistics, load_stats, read_mask_file, read_prompts, resolve_subsets, subset_masks
    from memloc.collect import Denoiser
    from memloc.ffn import find_ffn_layers

    n_prompts = args.subsets * args.subset_size
    prompts = read_prompts(args.data / "sdv1_500_memorized.jsonl")[:n_prompts]
    seeds = list(range(n_prompts))  # memloc's rule: prompt i gets seed 0 + i
    subsets = [list(range(s * args.subset_size, (s + 1) * args.subset_size)) for s in range(args.subsets)]
    if args.smoke:
        from memloc.tiny import build_tiny_pipeline

        device, dtype, size = "cpu", torch.float32, 16
        pipe = build_tiny_pipeline(args.data / "clip_tokenizer", channels=(16, 32, 32, 32))
    else:
        device, dtype, size = "cuda", torch.float16, 512
        pipe = build_sd15(args.data / "clip_tokenizer", device, dtype)
    runner = Denoiser(pipe, size, size, 7.5, args.steps, args.tau + 1)
    workdir = Path(tempfile.mkdtemp(prefix="bench_driver_"))

    # warm-up: kernels compiled / autotuned, allocator primed, for every provider
    with torch.inference_mode():
        forward_only(runner, prompts[: args.batch_size], seeds[: args.batch_size], args.batch_size)
    memloc_run(pipe, prompts[: args.batch_size], [list(range(args.batch_size))], args, workdir)
    run_baseline(runner, prompts, seeds, subsets[:1], args.sparsity)

    best = {}
    for _ in range(args.repeats):
        with torch.inference_mode():
            t = forward_only(runner, prompts, seeds, args.batch_size)
        best["forward"] = min(best.get("forward", t), t)
        c, loc, stats_path, mask_path = memloc_run(pipe, prompts, subsets, args, workdir)
        if c + loc < best.get("memloc_total", float("inf")):
            best.update(memloc_collect=c, memloc_localize=loc, memloc_total=c + loc)
        start = synced()
        baseline_masks = run_baseline(runner, prompts, seeds, subsets, args.sparsity)
        t = synced() - start
        best["baseline"] = min(best.get("baseline", t), t)

    # agreement of memloc's masks with the baseline's (fp16 activations: near-ties may differ)
    mask = read_mask_file(mask_path, device=device)
    bits = differ = 0
    for s, per_layer in enumerate(baseline_masks):
        for m, base in zip(mask.masks, per_layer):
            ours = mk.unpack_mask(m[s])
            bits += ours.numel()
            differ += int((ours != base).sum())
    sizes = [m.shape[-2] * m.shape[-1] for m in mask.masks]
    density = sum(float(mk.mask_density(m).mean()) * n for m, n in zip(mask.masks, sizes)) / sum(sizes)

    # the sweep: stats already collected; load once, then 1,000 subsets' masks
    start = synced()
    stats = load_stats(stats_path, device=device)
    subset_stats = SubsetStatistics(stats, args.tau, "uncond", device)
    load_time = synced() - start
    weights = [layer.weight.detach() for layer in find_ffn_layers(pipe.unet)]
    sweep_subsets = resolve_subsets(prompts, n_subsets=args.sweep, subset_size=args.subset_size, seed=1)
    with torch.inference_mode():
        subset_masks(weights, subset_stats, sweep_subsets[: args.subsets], args.sparsity, backend=args.backend)
        sweep_times = []
        for _ in range(args.repeats):
            start = synced()
            swept = subset_masks(weights, subset_stats, sweep_subsets, args.sparsity, backend=args.backend)
            sweep_times.append(synced() - start)
            del swept
    sweep = min(sweep_times)
    # the sweep's mask kernels alone, on sums computed beforehand: the rest of the sweep is driver overhead
    with torch.inference_mode():
        signal, null = subset_stats.sums(sweep_subsets)
        outs = [mk.PackedMask(torch.zeros(len(sweep_subsets), w.shape[0], mk.n_words(w.shape[1]), dtype=torch.int32,
                                          device=device), w.shape[1]) for w in weights]
        kernel_times = []
        for _ in range(args.repeats):
            start = synced()
            mk.memorized_masks(weights, signal, null, args.sparsity, outs=outs, check_finite=False,
                               backend=args.backend)
            kernel_times.append(synced() - start)
        del signal, null, outs
    sweep_kernels = min(kernel_times)

    forward = best["forward"]
    rows = [
        ("memloc collect", best["memloc_collect"], args.subsets),
        (f"memloc localize ({args.subsets} subsets)", best["memloc_localize"], args.subsets),
        ("memloc collect + localize", best["memloc_total"], args.subsets),
        ("(a) forward passes only", forward, args.subsets),
        ("(b) hooks + torch.topk", best["baseline"], args.subsets),
        (f"sweep: load stats for {args.sweep} subsets", load_time, None),
        (f"sweep: masks of {args.sweep} subsets", sweep, args.sweep),
        (f"sweep: mask kernels only ({args.sweep * (args.tau + 1)} vectors)", sweep_kernels, args.sweep),
    ]
    gpu = gpu_name()
    print(f"\nbench_driver on {gpu}: SD1.5 shapes fp16 512x512, {args.steps} steps, tau {args.tau}, s {args.sparsity}, "
          f"{args.subsets} subsets x {args.subset_size} prompts, batch {args.batch_size} prompts, "
          f"backends {mk.available_backends()}")
    print(f"{'what':42s} {'wall s':>9s} {'s/subset':>10s} {'x (a)':>7s}")
    for name, wall, count in rows:
        per = f"{wall / count:10.4f}" if count else " " * 10
        print(f"{name:42s} {wall:9.3f} {per} {wall / forward:7.3f}")
    ratio = best["memloc_total"] / forward
    print(f"\nmemloc / (a) = {ratio:.3f} (target <= 1.05): {'OK' if ratio <= 1.05 else 'MISSED'}; "
          f"memloc / (b) = {best['memloc_total'] / best['baseline']:.3f} (target < 1): "
          f"{'OK' if best['memloc_total'] < best['baseline'] else 'MISSED'}; "
          f"sweep {sweep:.3f} s (target <= 1 s): {'OK' if sweep <= 1 else 'MISSED'}")
    print(f"mask agreement with (b): {differ} of {bits} bits differ ({differ / bits:.2e}); mean density {density:.4%}")

    out = os.environ.get("OUT")
    if out:
        import diffusers

        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        common = {
            "gpu": gpu, "torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
            "backends": json.dumps(mk.available_backends()), "date": datetime.date.today().isoformat(),
            "commit": git_commit(), "subsets": args.subsets, "subset_size": args.subset_size, "tau": args.tau,
            "sparsity": args.sparsity, "steps": args.steps, "batch_prompts": args.batch_size, "dtype": "float16",
        }
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / "bench_driver.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["what", "wall_s", "per_subset_s", "ratio_to_forward", *common])
            writer.writeheader()
            for name, wall, count in rows:
                writer.writerow({"what": name, "wall_s": f"{wall:.6f}",
                                 "per_subset_s": f"{wall / count:.6f}" if count else "",
                                 "ratio_to_forward": f"{wall / forward:.4f}", **common})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
