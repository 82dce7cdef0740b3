"""``memloc train``: train a small model that memorizes, or fine-tune a pipeline so that it memorizes chosen images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MemlocError

DESCRIPTION = """\
From scratch (default): train a small StableDiffusionPipeline-format model (VAE, CLIP text encoder
with its own tokenizer, SD1-structured UNet) on procedural shape images with checkable captions
plus 32 scikit-image photographs that it is meant to memorize, within --max-minutes of wall time;
then reload it through from_pretrained and measure memorization (near copies of the photos over
seeds; attribute accuracy and diversity of generic captions).

--resume MODEL_DIR: continue from a model folder saved by memloc train (e.g. the shipped one): the
architecture, VAE (kept unchanged), tokenizer and scheduler come from MODEL_DIR; the UNet and text
encoder train on the same data for --max-minutes (default peak lr 2e-4, warm-up 50 steps).

--finetune: fine-tune --model on the images of --images, with --duplicate-images of them repeated
--duplicate times (the paper's Section 5.4 recipe), then measure near copies of the duplicated ones.

Writes the model folder --out and, into --report-dir, report.json, loss.png and samples.png.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a memorizing model (from scratch, or fine-tune with duplicated images)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output model folder (replaced atomically)")
    p.add_argument("--report-dir", default=None, help="folder for report.json, loss.png, samples.png "
                   "(default: OUT_report beside --out)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialization and sampling (default 0)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of the whole run, measurement included (default 7; finetune 30)")
    p.add_argument("--max-steps", type=int, default=10**7, help="stop the UNet training after this many steps")
    p.add_argument("--batch-size", type=int, default=None, help="UNet batch size (default 512; finetune 16)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4; --resume 2e-4; "
                   "finetune 1e-5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 200; --resume 50; "
                   "finetune 100)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions, for guidance")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--eval-seeds", type=int, default=None, help="seeds per caption in the measurement (default 16; "
                   "finetune 10)")
    p.add_argument("--eval-steps", type=int, default=30, help="DDIM steps in the measurement (default 30)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale in the measurement (default 5; "
                   "finetune 7.5)")
    p.add_argument("--log-every", type=int, default=25, help="steps between loss records (each one syncs)")

    s = p.add_argument_group("from scratch")
    s.add_argument("--preset", default=None, choices=("embedded", "tiny"),
                   help="model sizes: embedded (32x32, ~21 MB; the default) or tiny (16x16, for tests)")
    s.add_argument("--resume", default=None, metavar="MODEL_DIR",
                   help="continue training the model folder MODEL_DIR (saved by memloc train) instead of starting "
                   "afresh; its architecture, VAE, tokenizer and scheduler are kept (the --vae-* flags do not apply)")
    s.add_argument("--generic-images", type=int, default=200_000, help="procedural images in the pool (default 200000)")
    s.add_argument("--photo-share", type=float, default=0.3, help="share of each UNet batch drawn from the photos")
    s.add_argument("--photos", type=int, default=None, help="use only the first N photos (tests)")
    s.add_argument("--vae-fraction", type=float, default=0.15, help="share of the training time given to the VAE")
    s.add_argument("--vae-batch-size", type=int, default=256, help="VAE batch size (default 256)")
    s.add_argument("--vae-lr", type=float, default=1e-3, help="VAE learning rate (default 1e-3)")
    s.add_argument("--vae-max-steps", type=int, default=10**7, help="stop the VAE training after this many steps")
    s.add_argument("--reserve-seconds", type=float, default=None,
                   help="time kept for saving and measuring (default 10%% of the budget, 5-45 s)")
    s.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")

    f = p.add_argument_group("fine-tuning (--finetune)")
    f.add_argument("--finetune", action="store_true", help="fine-tune --model instead of training from scratch")
    f.add_argument("--model", default=None, help="local diffusers pipeline folder to fine-tune")
    f.add_argument("--images", default=None, help="image folder (captions: metadata.jsonl, NAME.txt or file name)")
    f.add_argument("--duplicate", type=int, default=50, help="times each chosen image appears (default 50)")
    f.add_argument("--duplicate-images", type=int, default=100, help="how many images to duplicate, chosen by --seed")
    f.add_argument("--duplicate-list", default=None, help="file with the names of the images to duplicate")
    f.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder")
    f.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    p.set_defaults(func=run)


def _pick(value, default):
    return default if value is None else value


def run(args: argparse.Namespace) -> int:
    if args.finetune:
        if args.resume:
            raise MemlocError("--resume continues a from-scratch model; --finetune takes --model instead")
        return _run_finetune(args)
    if args.model or args.images:
        raise MemlocError("--model and --images are for --finetune; training from scratch takes neither")
    from ..train.scratch import ScratchOptions, summary_lines, train_from_scratch

    resume = args.resume is not None
    opts = ScratchOptions(
        preset=args.preset,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        max_minutes=_pick(args.max_minutes, 7.0),
        reserve_seconds=args.reserve_seconds,
        vae_fraction=args.vae_fraction,
        batch_size=_pick(args.batch_size, 512),
        vae_batch_size=args.vae_batch_size,
        lr=_pick(args.lr, 2e-4 if resume else 5e-4),
        vae_lr=args.vae_lr,
        warmup_steps=_pick(args.warmup_steps, 50 if resume else 200),
        max_steps=args.max_steps,
        vae_max_steps=args.vae_max_steps,
        generic_images=args.generic_images,
        photo_share=args.photo_share,
        caption_dropout=args.caption_dropout,
        photos=args.photos,
        cuda_graphs=not args.no_cuda_graphs,
        channels_last=args.channels_last,
        eval_seeds=_pick(args.eval_seeds, 16),
        eval_steps=args.eval_steps,
        guidance=_pick(args.guidance, 5.0),
        log_every=args.log_every,
    )
    report = train_from_scratch(opts, args.out, args.report_dir)
    print("\n".join(summary_lines(report)))
    return 1 if report["errors"] else 0


def _run_finetune(args: argparse.Namespace) -> int:
    if not args.model or not args.images:
        raise MemlocError("--finetune needs --model (a local pipeline folder) and --images (an image folder)")
    from ..train.finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(
        model=args.model,
        images=args.images,
        duplicate=args.duplicate,
        duplicate_images=args.duplicate_images,
        duplicate_list=args.duplicate_list,
        seed=args.seed,
        device=args.device,
        max_minutes=_pick(args.max_minutes, 30.0),
        max_steps=args.max_steps,
        batch_size=_pick(args.batch_size, 16),
        lr=_pick(args.lr, 1e-5),
        warmup_steps=_pick(args.warmup_steps, 100),
        caption_dropout=args.caption_dropout,
        train_text_encoder=args.train_text_encoder,
        resolution=args.resolution,
        cuda_graphs=not args.no_cuda_graphs,
        eval_seeds=_pick(args.eval_seeds, 10),
        eval_steps=args.eval_steps,
        guidance=_pick(args.guidance, 7.5),
        log_every=args.log_every,
    )
    report = finetune(opts, args.out, args.report_dir)
    m = report.get("measurement", {})
    for key in ("duplicated", "not_duplicated"):
        if key in m:
            print(f"{key}: near-copy rate {m[key]['near_copy_rate']:.3f}, mean RMSE {m[key]['mean_rmse']:.4f} "
                  f"[{m[key]['captions']} captions x {m[key]['seeds']} seeds]")
    for err in report["errors"]:
        print(f"error: {err}", file=sys.stderr)
    print(f"model at {Path(args.out)}")
    return 1 if report["errors"] else 0
