"""``memloc train`` end to end on the CPU (tiny preset), the saved folder's loading path, packing, and model size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memloc.cli import main
from memloc.train import models
from memloc.train.manifest import read_manifest
from memloc.train.pack import pack, unpack

pytest.importorskip("skimage")


# one intra-op thread (conftest.py): the machines have 2 shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


TINY_RUN = [
    "--preset", "tiny", "--max-minutes", "1", "--reserve-seconds", "5", "--generic-images", "256",
    "--photos", "6", "--batch-size", "16", "--vae-batch-size", "16", "--max-steps", "12", "--vae-max-steps", "12",
    "--warmup-steps", "4", "--log-every", "4", "--eval-seeds", "2", "--eval-steps", "2", "--device", "cpu",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests below: (model folder, report folder, exit code)."""
    root = tmp_path_factory.mktemp("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--out", str(root / "model"), "--report-dir", str(root / "report"), *TINY_RUN])
    finally:
        torch.set_num_threads(threads)
    return root / "model", root / "report", code


def test_run_succeeds_and_writes_outputs(trained):
    model, report_dir, code = trained
    assert code == 0
    assert sorted(p.name for p in report_dir.iterdir()) == ["loss.png", "report.json", "samples.png"]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["errors"] == []
    assert report["vae"]["steps"] == 12 and report["unet"]["steps"] == 12
    assert report["unet"]["stopped_by"] == "max_steps"
    assert [r[0] for r in report["unet"]["curve"]["rows"]] == [4, 8, 12]
    assert report["unet"]["curve"]["columns"] == ["step", "loss", "loss_photo", "loss_generic"]
    assert set(report["timings_s"]) >= {"data", "vae", "encode", "unet", "save", "measure", "total"}
    mem = report["measurement"]["memorized"]
    assert mem["captions"] == 6 and mem["seeds"] == 2 and len(mem["per_caption"]) == 6
    assert 0.0 <= mem["near_copy_rate"] <= 1.0
    assert report["measurement"]["generic"]["captions"] == 24
    assert "memorized_guidance_7.5" in report["measurement"]
    assert report["model_bytes"] == models.folder_bytes(model)


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
def test_saved_model_loads_like_a_checkpoint(trained):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    model, _, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True, torch_dtype=torch.float32)
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert sorted(p.name for p in (model / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
    ]
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = list((model / part).glob("*.safetensors"))
        with safe_open(str(weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, part
    manifest = read_manifest(model)
    assert len(manifest.memorized) == 6 and manifest.photos.shape == (6, 16, 16, 3)
    ids = pipe.tokenizer(manifest.captions[0]).input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == manifest.captions[0]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(manifest.captions[0], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    ffn = [n for n, _ in pipe.unet.named_modules() if n.endswith("ff.net.2")]
    assert len(ffn) == 16


def test_training_space_matches_the_pipeline_sampler(trained):
    """A denoiser that predicts the noise exactly for the training latent of a photo (VAE posterior mean times
    the saved scaling factor, noised with the scheduler's alphas_cumprod as in training) makes the pipeline
    return that photo's VAE reconstruction: training and sampling use the same latent space and schedule."""
    from memloc.train.models import load_pipeline
    from memloc.train.vae import decode, encode

    model, _, _ = trained
    pipe = load_pipeline(model)
    manifest = read_manifest(model)
    photo = torch.from_numpy(manifest.photos[:1]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        x0 = encode(pipe.vae, photo) * pipe.vae.config.scaling_factor
        expected = decode(pipe.vae, x0 / pipe.vae.config.scaling_factor)[0].permute(1, 2, 0).numpy()
    alphas = pipe.scheduler.alphas_cumprod

    def oracle(sample, timestep, encoder_hidden_states=None, **kwargs):
        a = alphas[int(timestep)]
        return ((sample - a.sqrt() * x0) / (1 - a).sqrt(),)

    pipe.unet.forward = oracle
    out = pipe(manifest.captions[0], num_inference_steps=10, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    # Not exact: with set_alpha_to_one=False (as in SD1) DDIM's last step keeps sqrt(1 - alphas_cumprod[0]) noise.
    assert np.sqrt(((out - expected) ** 2).mean()) < 0.01
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 32


def test_pack_and_unpack_round_trip(trained, tmp_path):
    model, _, _ = trained
    parts = pack(model, tmp_path / "parts", part_mb=0.4)
    assert len(parts) >= 3 and all(p.stat().st_size <= 400_000 for p in parts)
    unpack(parts, tmp_path / "back")
    for f in model.rglob("*"):
        if f.is_file():
            assert (tmp_path / "back" / "model" / f.relative_to(model)).read_bytes() == f.read_bytes(), f


def test_embedded_preset_fits_the_size_limit(tmp_path):
    from transformers import CLIPTokenizer

    from memloc.train.photos import PHOTOS
    from memloc.train.shapes import CaptionTable
    from memloc.train.tokenizer import write_clip_tokenizer

    cfg = models.PRESETS["embedded"]
    tok_dir = write_clip_tokenizer(tmp_path / "tok", CaptionTable().captions + [p.caption for p in PHOTOS])
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    unet = models.build_unet(cfg)
    pipe = models.assemble(models.build_vae(cfg), models.build_text_encoder(cfg, tok), tok, unet,
                           models.build_scheduler())
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet.config.up_block_types == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    ffn = [m for n, m in unet.named_modules() if n.endswith("ff.net.2")]
    assert len(ffn) == 16
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[0]).__name__ == "GEGLU"
    models.save_pipeline(pipe, tmp_path / "model", torch.float16, tok_dir)
    size = models.folder_bytes(tmp_path / "model")
    assert size <= models.SIZE_LIMIT_BYTES, size


def test_help_lists_both_modes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--max-minutes" in text and "--finetune" in text and "--duplicate" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--finetune"], "--finetune needs --model"),
        (["--model", "x"], "--model and --images are for --finetune"),
        (["--max-minutes", "0"], "--max-minutes must be positive"),
        (["--photo-share", "1.5"], "--photo-share must be in"),
    ],
    ids=["finetune-without-model", "model-without-finetune", "zero-budget", "bad-share"],
)
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
