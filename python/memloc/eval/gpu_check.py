"""GPU check of the evaluation at Stable Diffusion 1.5 sizes with random weights: time and memory per stage.

Run: ``python -m memloc.eval.gpu_check`` (writes ``$OUT/eval_gpu_check.json`` when OUT is set).
Random weights say nothing about memorization; this measures that every stage runs on CUDA in
fp16 at real sizes (512 x 512 images, 4 x 64 x 64 latents, 77 x 768 text) and how long it takes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch


def build_sd15_pipeline(device: torch.device, dtype: torch.dtype):
    """A StableDiffusionPipeline with SD 1.5's published shapes and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..tiny import write_char_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(Path(tempfile.mkdtemp()) / "tok")))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed(device: torch.device, fn):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) / 2**30


def main() -> int:
    from .attack import AttackConfig, attack_pipeline
    from .detection import detection_metric
    from .mitigation import mitigate_embeddings
    from .sampling import encode_prompts, seeds_for
    from .tiled_l2 import tiled_l2

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    device, dtype = torch.device("cuda"), torch.float16
    pipe = build_sd15_pipeline(device, dtype)
    prompts = [f"a photo of object number {i} on a table" for i in range(10)]
    rows = []

    def record(stage: str, images: int, seconds: float, gib: float, note: str = "") -> None:
        rows.append({"stage": stage, "images": images, "seconds": seconds, "s_per_image": seconds / max(images, 1),
                     "peak_gib": gib, "note": note})  # fmt: skip

    detection_metric(pipe, prompts[:2], samples=1, steps=50, max_steps=1)  # warm-up
    d1, s, g = _timed(device, lambda: detection_metric(pipe, prompts, samples=1, steps=50, max_steps=1))
    record("detection, first step", 10, s, g, f"mean {d1.mean():.3f}")
    d50, s, g = _timed(device, lambda: detection_metric(pipe, prompts, samples=1, steps=50, batch_size=10))
    record("detection, 50 steps", 10, s, g, f"mean {d50.mean():.3f}")

    cond, null = encode_prompts(pipe, prompts), encode_prompts(pipe, [""])
    seeds = [seeds_for(p, 4) for p in range(len(prompts))]
    mit, s, g = _timed(
        device, lambda: mitigate_embeddings(pipe, cond, null, seeds, steps=50, target_loss=0.0, batch_size=16)
    )
    drop = sum(b - a for a, b in zip(mit.last_loss, mit.first_loss)) / len(prompts)
    record(
        "mitigation, 10 AdamW steps x 4 seeds", 10, s, g, f"first-step loss drop {drop:.3f}, iters {mit.iterations[0]}"
    )

    config = AttackConfig(samples=50, steps=50, batch_size=50)
    attack, s, g = _timed(device, lambda: attack_pipeline(pipe, prompts[:2], config, progress=False))
    record("attack: 50 samples x 50 steps + tiled L2 + cliques", 100, s, g,
           f"max cliques {[r['max_clique'] for r in attack]}")  # fmt: skip

    images = torch.randint(0, 256, (50, 512, 512, 3), dtype=torch.uint8)
    _, s, g = _timed(device, lambda: tiled_l2(images, device=device))
    record("tiled L2, 50 x 50 pairs at 512 x 512 (GPU, float64)", 50, s, g)
    _, s_cpu, _ = _timed(device, lambda: tiled_l2(images[:10]))
    record("tiled L2, 10 x 10 pairs at 512 x 512 (CPU, float64)", 10, s_cpu, 0.0)

    name = torch.cuda.get_device_name(device)
    print(f"memloc eval GPU check on {name}, torch {torch.__version__}, fp16, SD 1.5 shapes, random weights")
    print(f"{'stage':58s} {'images':>6s} {'seconds':>8s} {'s/img':>8s} {'peak GiB':>8s}  note")
    for r in rows:
        numbers = f"{r['images']:6d} {r['seconds']:8.2f} {r['s_per_image']:8.3f} {r['peak_gib']:8.2f}"
        print(f"{r['stage']:58s} {numbers}  {r['note']}")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "eval_gpu_check.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
