"""``memloc train --resume``: continues from the loaded weights, keeps the VAE bit for bit, saves a complete model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from memloc.cli import main
from memloc.train import scratch
from memloc.train.manifest import read_manifest
from memloc.train.models import load_pipeline

pytest.importorskip("skimage")

# Tiny and short: a few steps per phase, one seed and two DDIM steps in the measurement.
COMMON = [
    "--max-minutes", "1", "--reserve-seconds", "5", "--generic-images", "128", "--photos", "4",
    "--batch-size", "8", "--log-every", "3", "--eval-seeds", "1", "--eval-steps", "2", "--device", "cpu",
]
FIRST = ["--preset", "tiny", "--max-steps", "6", "--vae-max-steps", "6", "--warmup-steps", "2",
         "--vae-batch-size", "8", *COMMON]
RESUMED = ["--max-steps", "6", "--warmup-steps", "2", *COMMON]


# one intra-op thread (conftest.py): the machines have 2 shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(folder, part):
    from safetensors.torch import load_file

    (path,) = list((folder / part).glob("*.safetensors"))
    return load_file(str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny model trained from scratch, then resumed from, with the resumed run's initial weights recorded."""
    root = tmp_path_factory.mktemp("resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    initial = []
    real_run_loop = scratch.run_loop

    def recording_run_loop(step, opt, params, **kwargs):
        if kwargs.get("desc") == "unet":
            initial.append([p.detach().clone() for p in params])
        return real_run_loop(step, opt, params, **kwargs)

    try:
        first = root / "first"
        assert main(["train", "--out", str(first), "--report-dir", str(root / "first_report"), *FIRST]) == 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(scratch, "run_loop", recording_run_loop)
            code = main(["train", "--out", str(root / "resumed"), "--report-dir", str(root / "resumed_report"),
                         "--resume", str(first), *RESUMED])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((root / "resumed_report" / "report.json").read_text())
    return {"first": first, "resumed": root / "resumed", "code": code, "report": report, "initial": initial}


def test_resumed_run_succeeds_without_training_a_vae(runs):
    report = runs["report"]
    assert runs["code"] == 0 and report["errors"] == []
    assert report["resumed_from"] == str(runs["first"])
    assert report["resumed_from_training"]["unet_steps"] == 6
    assert report["unet"]["steps"] == 6 and report["unet"]["stopped_by"] == "max_steps"
    assert report["vae"]["kept_from"] == str(runs["first"]) and "steps" not in report["vae"]
    assert "load" in report["timings_s"] and "vae" not in report["timings_s"]
    assert report["options"]["lr"] == 2e-4 and report["options"]["preset"] is None
    assert report["model_config"]["image_size"] == 16 and report["model_config"]["text_width"] == 32


def test_resumed_run_starts_from_the_loaded_weights(runs):
    (initial,) = runs["initial"]
    loaded = load_pipeline(runs["first"])
    expected = list(loaded.unet.parameters()) + list(loaded.text_encoder.parameters())
    assert len(initial) == len(expected)
    differing = [i for i, (a, b) in enumerate(zip(initial, expected))
                 if a.dtype != torch.float32 or not torch.equal(a, b)]
    assert differing == [], f"{len(differing)} of {len(expected)} tensors differ from the loaded ones: {differing[:3]}"
    # ...and then trains them: the saved UNet and text encoder are no longer the first run's.
    for part in ("unet", "text_encoder"):
        before, after = _weights(runs["first"], part), _weights(runs["resumed"], part)
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{part} unchanged by the resumed run"


def test_vae_and_tokenizer_are_kept_bit_for_bit(runs):
    first, resumed = runs["first"], runs["resumed"]
    before, after = _weights(first, "vae"), _weights(resumed, "vae")
    assert before.keys() == after.keys()
    differing = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert differing == [], f"{len(differing)} VAE tensors changed, e.g. {differing[:3]}"
    config = [json.loads((f / "vae" / "config.json").read_text())["scaling_factor"] for f in (first, resumed)]
    assert config[0] == config[1] == runs["report"]["vae"]["scaling_factor"]
    for f in (first / "tokenizer").iterdir():
        assert (resumed / "tokenizer" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
def test_output_is_a_complete_model_folder(runs):
    resumed = runs["resumed"]
    pipe = load_pipeline(resumed)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    manifest = read_manifest(resumed)
    assert len(manifest.memorized) == 4 and manifest.photos.shape == (4, 16, 16, 3)
    assert manifest.generic_eval == read_manifest(runs["first"]).generic_eval
    training = manifest.training
    assert training["resumed_from"] == str(runs["first"]) and training["previous"]["unet_steps"] == 6
    assert training["unet_steps"] == 6 and training["unet_steps_total"] == 12 and training["vae_steps"] == 0
    assert runs["report"]["measurement"]["memorized"]["captions"] == 4
    out = pipe(manifest.captions[0], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(out)).all()


def test_captions_must_tokenize_into_whole_words(tmp_path):
    from transformers import CLIPTokenizer

    from memloc.errors import MemlocError
    from memloc.train.resume import check_captions
    from memloc.train.tokenizer import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path, ["a red circle", "two cats"], 16)))
    check_captions(tokenizer, ["a red circle", "two cats", "a circle"], "m")  # unseen combination, known words
    with pytest.raises(MemlocError, match="splits 1 of the 2 training captions.*'a blue circle'"):
        check_captions(tokenizer, ["a red circle", "a blue circle"], "m")
    with pytest.raises(MemlocError, match="must be lowercase"):
        check_captions(tokenizer, ["A red circle"], "m")


def _mismatched_tokenizer(runs, tmp_path):
    from memloc.train.tokenizer import write_clip_tokenizer

    other = tmp_path / "other"
    shutil.copytree(runs["first"], other)
    shutil.rmtree(other / "tokenizer")
    write_clip_tokenizer(other / "tokenizer", ["a cat on a mat"], 32)
    return str(other)


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda runs, tmp: ["--resume", str(tmp / "missing")], "missing: not a folder"),
        (lambda runs, tmp: ["--resume", str(tmp)], "no model_index.json"),
        (lambda runs, tmp: ["--resume", _mismatched_tokenizer(runs, tmp)], "incompatible components: tokenizer has"),
        (lambda runs, tmp: ["--resume", str(runs["first"]), "--preset", "tiny"], "--preset and --resume"),
        (lambda runs, tmp: ["--resume", str(runs["first"]), "--finetune"], "--resume continues a from-scratch"),
        (lambda runs, tmp: ["--resume", str(runs["first"]), "--lr", "0"], "--lr must be positive"),
    ],
    ids=["missing-folder", "not-a-pipeline", "mismatched-tokenizer", "with-preset", "with-finetune", "zero-lr"],
)
def test_bad_resume_gives_one_line_errors(runs, tmp_path, capsys, make_argv, message):
    argv = make_argv(runs, tmp_path)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "m"), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m").exists()
