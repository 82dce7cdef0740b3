"""``memloc attack`` and ``memloc eval`` end to end on a tiny pipeline folder (CPU)."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from memloc.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny pipeline, a prompt file, a training-image folder, fake SSCD and FID Inception files."""
    from memloc.tiny import build_tiny_pipeline, write_char_tokenizer

    root = tmp_path_factory.mktemp("eval_cli")
    pipe = build_tiny_pipeline(write_char_tokenizer(root / "tok"), seed=0)
    pipe.save_pretrained(str(root / "model"))
    (root / "prompts.txt").write_text("a red square\nthe starry night\n")
    (root / "quality.txt").write_text("a cat\na boat\n")
    rng = np.random.default_rng(0)
    for name in ("train", "reference"):
        (root / name).mkdir()
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(root / name / f"{j}.png")
    torch.jit.script(_FakeSSCD()).save(str(root / "sscd.pt"))
    torch.jit.script(_FakeInception()).save(str(root / "inception.pt"))
    return root


class _FakeSSCD(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


class _FakeInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_attack_before_and_after_a_pruned_folder(files, tmp_path):
    out = tmp_path / "attack"
    code = main(
        ["attack", "--model", str(files / "model"), "--pruned-model", str(files / "model"), "--prompts",
         str(files / "prompts.txt"), "--training-images", str(files / "train"), "--samples", "3", "--steps", "1",
         "--threshold", "1e4", "--batch-size", "6", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    table = _rows(out / "table1.csv")
    assert [(r["model"], r["identified"], r["actually_memorized"]) for r in table] == [
        ("before pruning", "2", "2"),
        ("after pruning", "2", "2"),
    ]
    assert json.loads((out / "table1.json").read_text())["config"]["threshold"] == 1e4
    assert "Identified as memorized" in (out / "table1.md").read_text()
    assert len(_rows(out / "per_prompt.csv")) == 4
    assert sorted(p.name for p in (out / "cliques" / "after").iterdir()) == ["0000.png", "0001.png"]


def test_attack_with_a_mask_goes_through_the_driver(files, tmp_path, monkeypatch):
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"made by memloc localize")
    calls = []

    def apply_mask_file(pipe, path, backend="auto"):
        calls.append((path.name, backend))
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if name.endswith("ff.net.2.weight"):
                    param.zero_()

    build_parser()  # the commands import the real driver first, whatever ran before this test
    fake = type(sys)("memloc.prune")
    fake.apply_mask_file = apply_mask_file
    monkeypatch.setitem(sys.modules, "memloc.prune", fake)
    out = tmp_path / "attack"
    code = main(
        ["attack", "--model", str(files / "model"), "--mask", str(mask), "--prompts", str(files / "prompts.txt"),
         "--samples", "2", "--steps", "1", "--backend", "reference", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert code == 0 and calls == [("mask.safetensors", "reference")]
    rows = _rows(out / "per_prompt.csv")
    before = [float(r["detection"]) for r in rows if r["model"] == "before pruning"]
    after = [float(r["detection"]) for r in rows if r["model"] == "after pruning"]
    assert len(before) == len(after) == 2 and before != after
    assert all(r["actually_memorized"] == "" for r in rows)  # no training images: unknown


def test_attack_mask_without_driver_fails_before_sampling(files, tmp_path, monkeypatch, capsys):
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"x")
    build_parser()  # the commands import the real driver first, whatever ran before this test
    monkeypatch.setitem(sys.modules, "memloc.prune", None)
    out = tmp_path / "attack"
    model, prompts = str(files / "model"), str(files / "prompts.txt")
    code = main(["attack", "--model", model, "--mask", str(mask), "--prompts", prompts, "--out", str(out)])
    assert code == 2
    assert "--mask needs memloc.prune" in capsys.readouterr().err
    assert not out.exists()


def test_eval_compares_three_methods(files, tmp_path):
    out = tmp_path / "eval"
    code = main(
        ["eval", "--model", str(files / "model"), "--pruned-model", str(files / "model"), "--prompts",
         str(files / "prompts.txt"), "--quality-prompts", str(files / "quality.txt"), "--training-images",
         str(files / "train"), "--sscd", str(files / "sscd.pt"), "--fid-reference", str(files / "reference"),
         "--inception", str(files / "inception.pt"), "--samples", "2", "--steps", "2", "--mitigation-target-loss", "0",
         "--mitigation-iters", "2", "--mitigation-samples", "2", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = {r["method"]: r for r in _rows(out / "summary.csv")}
    assert list(summary) == ["none", "mitigation", "pruned"]
    for row in summary.values():
        assert int(row["images"]) == 2 * 2 + 2 * 1
        assert float(row["seconds_per_image"]) > 0
        for key in ("detection", "tiled_l2_to_training", "copy_rate", "sscd", "fid"):
            assert row[key] != "", f"{key} missing for {row['method']}"
    assert float(summary["mitigation"]["mitigation_iterations"]) == 2
    # the pruned folder is the same model: same seeds, same numbers
    assert summary["pruned"]["detection"] == summary["none"]["detection"]
    assert float(summary["mitigation"]["detection"]) < float(summary["none"]["detection"])
    assert len(_rows(out / "per_prompt.csv")) == 3 * 2
    assert (out / "fig3_fid_vs_memorization.png").stat().st_size > 0
    assert (out / "fig4_seconds_per_image.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "samples" / "mitigation").iterdir()) == ["0000.png", "0001.png"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sscd", "missing.pt", "--training-images", "TRAIN"], "SSCD model file missing.pt does not exist"),
        (["--sscd", "SSCD"], "--sscd measures similarity to training images"),
        (["--clip-model", "no_clip"], "CLIP model folder no_clip is missing"),
        (["--inception", "INCEPTION"], "pass the reference image folder with --fid-reference"),
        (["--fid-reference", "TRAIN"], "FID needs Inception weights"),
        (["--methods", "pruned"], "--methods pruned needs --mask or --pruned-model"),
        (["--attribute-accuracy"], "needs a model trained by memloc train"),
    ],
    ids=["sscd-missing", "sscd-no-training", "clip-missing", "inception-no-reference", "fid-no-inception",
         "pruned-without-model", "attributes-not-memloc-model"],
)  # fmt: skip
def test_eval_optional_model_messages(files, tmp_path, capsys, extra, message):
    names = {"TRAIN": str(files / "train"), "SSCD": str(files / "sscd.pt"), "INCEPTION": str(files / "inception.pt")}
    extra = [names.get(a, a) for a in extra]
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(files / "model"), "--prompts", str(files / "prompts.txt"), "--out", str(out),
                 *extra])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("attack", ["--tile-grid", "100"], "--tile-grid must be in 1..16 for 16x16 images"),
        ("eval", ["--tile-grid", "64"], "--tile-grid must be in 1..16 for 16x16 images"),
        ("attack", ["--guidance", "nan"], "guidance must be a finite number"),
        ("eval", ["--guidance", "nan"], "--guidance must be a finite number"),
        ("eval", ["--mitigation-lr", "-1"], "--mitigation-lr must be a number > 0"),
        ("eval", ["--mitigation-iters", "-1"], "--mitigation-iters must be >= 0"),
        ("eval", ["--threshold", "0"], "--threshold must be a number > 0"),
        ("eval", ["--save-samples", "-1"], "--save-samples must be >= 0"),
    ],
    ids=["attack-grid", "eval-grid", "attack-guidance", "eval-guidance", "eval-lr", "eval-iters", "eval-threshold",
         "eval-save-samples"],
)
def test_bad_settings_fail_before_sampling(files, tmp_path, capsys, monkeypatch, command, extra, message):
    import memloc.eval.attack
    import memloc.eval.compare

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started before the settings were checked")

    monkeypatch.setattr(memloc.eval.attack, "attack_pipeline", no_sampling)
    monkeypatch.setattr(memloc.eval.compare, "evaluate_method", no_sampling)
    out = tmp_path / command
    code = main([command, "--model", str(files / "model"), "--prompts", str(files / "prompts.txt"), "--samples", "3",
                 "--steps", "1", "--device", "cpu", "--out", str(out), *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
