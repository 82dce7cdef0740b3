"""The ``memloc`` command end to end on a tiny SD1-structured pipeline, and every bad input it must refuse."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import memloc_kernels as mk
from memloc import cli
from memloc.api import find_ffn_layers, load_pipeline, load_stats, read_mask_file
from memloc.stats import StatsCheckpoint, read_stats_metadata
from memloc.tiny import build_tiny_pipeline, write_char_tokenizer

PROMPTS = ["a photo of a cat", "a red car on a road", "the mona lisa", "blue sky over green hills"]
CHANNELS = (16, 32, 32, 32)
IMAGE = 16  # pixels: the tiny VAE downsamples the 8x8 latents by 2


def _save_tiny(root: Path, name: str, seed: int, channels=CHANNELS) -> Path:
    pipe = build_tiny_pipeline(root / "tokenizer", seed=seed, channels=channels)
    pipe.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Model folders (the model, another with the same shapes, one with other shapes), prompt files, statistics."""
    root = tmp_path_factory.mktemp("cli")
    write_char_tokenizer(root / "tokenizer")
    paths = {
        "root": root,
        "model": _save_tiny(root, "model", seed=1),
        "other_weights": _save_tiny(root, "other_weights", seed=2),
        "other_shapes": _save_tiny(root, "other_shapes", seed=1, channels=(32, 32, 32, 32)),
        "prompts": root / "prompts.txt",
        "stats": root / "stats.safetensors",
    }
    paths["prompts"].write_text("\n".join(PROMPTS) + "\n")
    rc = cli.main(["collect", "--model", str(paths["model"]), "--prompts", str(paths["prompts"]),
                   "--out", str(paths["stats"]), "--steps", "3", "--timesteps", "1", "--batch-size", "4",
                   "--null", "empty", "--device", "cpu"])
    assert rc == 0
    paths["mask"] = root / "mask.safetensors"
    rc = cli.main(["localize", "--stats", str(paths["stats"]), "--out", str(paths["mask"]), "--sparsity", "0.05",
                   "--subsets", "3", "--subset-size", "2", "--seed", "1"])
    assert rc == 0
    return paths


def test_every_subcommand_has_help(capsys):
    for command, flag in [("collect", "--timesteps"), ("localize", "--sparsity"), ("prune", "--mask-only"),
                          ("analyze", "--subsets"), ("generate", "--seeds")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert flag in out and "--backend" in out and "--device" in out, command


def test_collect_writes_complete_statistics(env):
    stats = load_stats(env["stats"])
    assert stats.prompts == PROMPTS and stats.meta["seeds"] == [0, 1, 2, 3]
    assert len(stats.layers) == 16 and stats.n_steps == 2 and stats.meta["null"] == "empty"
    width = sum(layer["d_in"] for layer in stats.layers)
    for name in ("cond", "uncond", "null_cond", "null_uncond"):
        assert tuple(stats.tensors[name].shape) == (4, 2, width)
        assert bool((stats.tensors[name] > 0).any()) and bool((stats.tensors[name] >= 0).all())
    assert not torch.equal(stats.tensors["cond"], stats.tensors["uncond"])
    assert not (env["root"] / "stats.safetensors.partial").exists()


def test_localize_prune_generate_analyze_end_to_end(env, tmp_path):
    mask = read_mask_file(env["mask"])
    assert mask.n_subsets == 3 and len(mask.masks) == 16 and mask.meta["tau"] == 1
    assert all(len(s) == 2 for s in mask.meta["subsets"])
    union = [mk.unpack_mask(m).any(0) for m in mask.masks]
    assert sum(int(u.sum()) for u in union) > 0

    pruned_dir = tmp_path / "pruned"
    assert cli.main(["prune", "--model", str(env["model"]), "--mask", str(env["mask"]), "--out", str(pruned_dir)]) == 0
    original = load_pipeline(env["model"], "cpu", "float32").unet.state_dict()
    pruned = load_pipeline(pruned_dir, "cpu", "float32").unet.state_dict()
    names = [layer["name"] + ".weight" for layer in mask.meta["model"]["layers"]]
    for key, value in original.items():
        if key in names:
            u = union[names.index(key)]
            assert bool((pruned[key][u] == 0).all()) and torch.equal(pruned[key][~u], value[~u]), key
        else:
            assert torch.equal(pruned[key], value), key
    assert read_mask_file(pruned_dir / "memloc_mask.safetensors").n_subsets == 1

    packed = tmp_path / "union.safetensors"
    assert cli.main(["prune", "--model", str(env["model"]), "--mask", str(env["mask"]), "--out", str(packed),
                     "--mask-only"]) == 0
    for m, u in zip(read_mask_file(packed).masks, union):
        assert torch.equal(mk.unpack_mask(m)[0], u)

    short = tmp_path / "two.txt"
    short.write_text("a photo of a cat\nthe mona lisa\n")
    grid = tmp_path / "grid.png"
    assert cli.main(["generate", "--model", str(env["model"]), "--mask", str(env["mask"]), "--prompts", str(short),
                     "--seeds", "0", "1", "--steps", "1", "--out", str(grid)]) == 0
    from PIL import Image

    image = np.asarray(Image.open(grid))
    assert image.shape == (4 * IMAGE + 3 * 4, 2 * IMAGE + 4, 3)
    legend = json.loads((tmp_path / "grid.json").read_text())  # which row is which
    assert [(r["prompt"], r["seed"]) for r in legend["rows"]] == [
        ("a photo of a cat", 0), ("a photo of a cat", 1), ("the mona lisa", 0), ("the mona lisa", 1)]
    assert legend["columns"] == ["original", "pruned"] and legend["steps"] == 1 and legend["mask"] == str(env["mask"])
    # the pruned column equals what the saved pruned pipeline generates with the same seeds
    alone = tmp_path / "alone.png"
    assert cli.main(["generate", "--model", str(pruned_dir), "--prompts", str(short), "--seeds", "0", "1",
                     "--steps", "1", "--out", str(alone)]) == 0
    assert np.array_equal(np.asarray(Image.open(alone)), image[:, IMAGE + 4 :])
    assert not np.array_equal(image[:, :IMAGE], image[:, IMAGE + 4 :])

    analysis = tmp_path / "analysis"
    assert cli.main(["analyze", "--stats", str(env["stats"]), "--out", str(analysis), "--subsets", "3",
                     "--subset-size", "2", "--seed", "1", "--sparsity", "0.05"]) == 0
    rows = list(csv.DictReader(open(analysis / "analysis.csv")))
    assert len(rows) == (2 + 1) * 16
    assert {r["timestep_index"] for r in rows} == {"0", "1", "union"}
    for r in rows:
        assert 0 <= float(r["density_mean"]) <= 1
        assert np.isnan(float(r["iou_mean"])) or 0 <= float(r["iou_mean"]) <= 1
    union_rows = [r for r in rows if r["timestep_index"] == "union"]
    densities = [float(mk.mask_density(m).mean()) for m in mask.masks]
    assert [float(r["density_mean"]) for r in union_rows] == pytest.approx(densities)
    assert json.loads((analysis / "analysis.json").read_text())["subsets"] == mask.meta["subsets"]
    for png in ("density.png", "iou.png", "union_by_layer.png"):
        assert (analysis / png).stat().st_size > 1000


def _incomplete_stats(env) -> Path:
    meta = read_stats_metadata(env["stats"])
    out = env["root"] / "incomplete.safetensors"
    if not out.exists():
        checkpoint, _ = StatsCheckpoint.open(out, meta)
        checkpoint.finish(out)
    return out


def _malformed_models(env) -> dict[str, Path]:
    root = env["root"] / "malformed"
    if not root.exists():
        (root / "empty").mkdir(parents=True)
        (root / "bad_json").mkdir()
        (root / "bad_json" / "model_index.json").write_text("{not json")
        shutil.copytree(env["model"], root / "no_weights")
        for f in (root / "no_weights" / "unet").glob("*.safetensors"):
            f.unlink()
    return {p.name: p for p in root.iterdir()}


def _nan_weight_model(env) -> Path:
    """The model with one NaN in its last FFN's second linear weight (its fingerprint is unchanged)."""
    out = env["root"] / "nan_weight"
    if not out.exists():
        pipe = load_pipeline(env["model"], "cpu")
        with torch.no_grad():
            find_ffn_layers(pipe.unet)[-1].linear.weight[0, 3] = float("nan")
        pipe.save_pretrained(out)
    return out


def _nan_stats(env) -> Path:
    """The statistics file with one NaN in its conditional statistics."""
    out = env["root"] / "nan_stats.safetensors"
    if not out.exists():
        with safe_open(env["stats"], "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors["cond"].view(-1)[5] = float("nan")
        save_file(tensors, out, metadata=metadata)
    return out


def _prompt_file(env, name: str, text: str) -> Path:
    path = env["root"] / name
    path.write_text(text)
    return path


def _collect(env, out, **over):
    args = {"--model": str(env["model"]), "--prompts": str(env["prompts"]), "--steps": "3", "--timesteps": "1",
            "--device": "cpu"}
    args.update(over)
    return ["collect", *[x for k, v in args.items() for x in (k, v)], "--out", str(out)]


def _localize(env, out, *extra):
    return ["localize", "--stats", str(env["stats"]), "--out", str(out), *extra]


def _prune(env, out, *extra, model=None):
    return ["prune", "--model", str(model or env["model"]), "--mask", str(env["mask"]), "--out", str(out), *extra]


# (id, argv(env, out) -> list, message fragment, output name)
BAD_INPUTS = [
    ("model-missing", lambda e, o: _collect(e, o, **{"--model": str(e["root"] / "nope")}), "does not exist", "s.st"),
    ("model-not-a-pipeline", lambda e, o: _collect(e, o, **{"--model": str(_malformed_models(e)["empty"])}),
     "model_index.json is missing", "s.st"),
    ("model-index-not-json", lambda e, o: _collect(e, o, **{"--model": str(_malformed_models(e)["bad_json"])}),
     "not valid JSON", "s.st"),
    ("model-weights-absent", lambda e, o: _collect(e, o, **{"--model": str(_malformed_models(e)["no_weights"])}),
     "weights are not in", "s.st"),
    ("prompts-missing", lambda e, o: _collect(e, o, **{"--prompts": str(e["root"] / "none.txt")}),
     "does not exist", "s.st"),
    ("prompts-empty", lambda e, o: _collect(e, o, **{"--prompts": str(_prompt_file(e, "empty.txt", "\n \n"))}),
     "holds no prompts", "s.st"),
    ("prompts-malformed-jsonl", lambda e, o: _collect(e, o, **{"--prompts": str(_prompt_file(
        e, "bad.jsonl", '{"caption": "ok"}\n{"caption": oops}\n'))}), "line 2 is not JSON", "s.st"),
    ("prompts-duplicated", lambda e, o: _collect(e, o, **{"--prompts": str(_prompt_file(
        e, "dup.txt", "a cat\na dog\na cat\n"))}), "repeats the prompt of line 1", "s.st"),
    ("model-gives-nan", lambda e, o: _collect(e, o, **{"--model": str(_nan_weight_model(e))}),
     "are NaN or inf for prompt 1", "s.st"),
    ("tau-beyond-steps", lambda e, o: _collect(e, o, **{"--steps": "3", "--timesteps": "5"}), "beyond", "s.st"),
    ("bad-device", lambda e, o: _collect(e, o, **{"--device": "nonsense"}), "not a torch device", "s.st"),
    ("output-unwritable", lambda e, o: _collect(e, Path("/proc/memloc-test/s.st")), "cannot create output folder",
     None),
    ("output-is-a-folder", lambda e, o: _collect(e, e["root"]), "is a folder", None),
    ("output-under-a-file", lambda e, o: _localize(e, e["prompts"] / "m.st"), "is a file, not a folder", None),
    ("analyze-output-is-a-file", lambda e, o: ["analyze", "--stats", str(e["stats"]), "--out", str(e["prompts"])],
     "is a file, expected a folder", None),
    ("prune-output-is-a-file", lambda e, o: _prune(e, e["prompts"]), "is a file, expected a folder", None),
    ("output-is-its-statistics", lambda e, o: _localize(e, e["stats"]), "would overwrite the statistics file", None),
    ("output-inside-the-model", lambda e, o: _prune(e, e["model"] / "unet"), "would overwrite the model", None),
    ("output-is-the-current-folder", lambda e, o: ["analyze", "--stats", str(e["stats"]), "--out", "."],
     "is the current folder", None),
    ("sparsity-zero", lambda e, o: _localize(e, o, "--sparsity", "0"), "in (0, 1]", "m.st"),
    ("sparsity-above-one", lambda e, o: _localize(e, o, "--sparsity", "1.5"), "in (0, 1]", "m.st"),
    ("sparsity-nan", lambda e, o: _localize(e, o, "--sparsity", "nan"), "(0, 1]", "m.st"),
    ("localize-tau-beyond-stats", lambda e, o: _localize(e, o, "--timesteps", "4"), "beyond the statistics", "m.st"),
    ("stats-missing", lambda e, o: ["localize", "--stats", str(e["root"] / "none.st"), "--out", str(o)],
     "does not exist", "m.st"),
    ("stats-is-a-folder", lambda e, o: ["localize", "--stats", str(e["model"]), "--out", str(o)], "is a folder",
     "m.st"),
    ("mask-is-a-folder", lambda e, o: ["prune", "--model", str(e["model"]), "--mask", str(e["model"]), "--out",
                                       str(o)], "is a folder", "pruned"),
    ("stats-not-stats", lambda e, o: ["localize", "--stats", str(e["mask"]), "--out", str(o)],
     "not a memloc statistics file", "m.st"),
    ("stats-incomplete", lambda e, o: ["localize", "--stats", str(_incomplete_stats(e)), "--out", str(o)],
     "incomplete", "m.st"),
    ("stats-hold-nan", lambda e, o: ["localize", "--stats", str(_nan_stats(e)), "--out", str(o)],
     "hold NaN, inf or negative values", "m.st"),
    ("weights-hold-nan", lambda e, o: _localize(e, o, "--model", str(_nan_weight_model(e))),
     "ff.net.2 holds NaN or inf", "m.st"),
    ("stats-other-model-weights", lambda e, o: _localize(e, o, "--model", str(e["other_weights"])),
     "different model", "m.st"),
    ("stats-other-model-shapes", lambda e, o: _localize(e, o, "--model", str(e["other_shapes"])),
     "does not match this model", "m.st"),
    ("subset-size-too-large", lambda e, o: _localize(e, o, "--subsets", "2", "--subset-size", "9"),
     "--subset-size must be in 1..4", "m.st"),
    ("subset-unknown-prompt", lambda e, o: _localize(e, o, "--subset", str(_prompt_file(e, "sub.txt", "a zebra\n"))),
     "not in the statistics file", "m.st"),
    ("mask-other-model-weights", lambda e, o: _prune(e, o, model=e["other_weights"]), "different model", "pruned"),
    ("mask-other-model-shapes", lambda e, o: _prune(e, o, model=e["other_shapes"]), "does not match", "pruned"),
    ("mask-only-other-model", lambda e, o: _prune(e, o, "--mask-only", model=e["other_shapes"]), "does not match",
     "m.st"),
    ("mask-subset-index", lambda e, o: _prune(e, o, "--subset-index", "7"), "outside the mask file's 3", "pruned"),
    ("mask-not-a-mask", lambda e, o: ["prune", "--model", str(e["model"]), "--mask", str(e["stats"]), "--out",
                                      str(o)], "not a memloc mask file", "pruned"),
    ("generate-mask-other-model", lambda e, o: ["generate", "--model", str(e["other_weights"]), "--mask",
                                                str(e["mask"]), "--prompts", str(e["prompts"]), "--out", str(o)],
     "different model", "g.png"),
    ("generate-guidance-nan", lambda e, o: ["generate", "--model", str(e["model"]), "--prompts", str(e["prompts"]),
                                            "--guidance-scale", "nan", "--out", str(o)], "finite number", "g.png"),
    ("generate-subset-without-mask", lambda e, o: ["generate", "--model", str(e["model"]), "--prompts",
                                                   str(e["prompts"]), "--subset-index", "0", "--out", str(o)],
     "give --mask too", "g.png"),
    ("generate-not-png", lambda e, o: ["generate", "--model", str(e["model"]), "--prompts", str(e["prompts"]),
                                       "--out", str(o)], "must be a .png", "g.jpg"),
]


@pytest.mark.parametrize(("argv", "fragment", "name"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_error_without_output(env, tmp_path, capsys, argv, fragment, name):
    out = tmp_path / (name or "unused")
    argv = argv(env, out)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"memloc {argv[0]}: error:") and fragment in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "partial output left behind"


def test_out_of_gpu_memory_suggests_a_smaller_batch(env, tmp_path, capsys, monkeypatch):
    import memloc.collect as collect

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(collect, "_denoise_batch", oom)
    assert cli.main(_collect(env, tmp_path / "s.st")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "smaller --batch-size" in err, err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_with_other_settings_is_refused_then_restarted(env, tmp_path, capsys, monkeypatch):
    import memloc.collect as collect

    real = collect._denoise_batch
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "s.st"
    monkeypatch.setattr(collect, "_denoise_batch", interrupt_second)
    assert cli.main(_collect(env, out, **{"--batch-size": "2"})) == 130
    monkeypatch.setattr(collect, "_denoise_batch", real)
    capsys.readouterr()
    assert cli.main(_collect(env, out, **{"--seed": "5"})) == 2
    assert "--restart" in capsys.readouterr().err
    assert cli.main([*_collect(env, out, **{"--seed": "5"}), "--restart"]) == 0
    assert load_stats(out).meta["seeds"] == [5, 6, 7, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.st"]


def test_hub_id_without_network_says_the_weights_are_not_here(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "s.st"
    assert cli.main(["collect", "--model", "memloc-tests/no-such-model", "--prompts", str(prompts), "--out",
                     str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights are not on this machine" in err, err
    assert not out.exists()


def test_missing_embedded_model_is_named(env, tmp_path, capsys, monkeypatch):
    import memloc.pipeline

    monkeypatch.setattr(memloc.pipeline, "DEFAULT_MODEL", tmp_path / "assets" / "model")
    out = tmp_path / "s.st"
    assert cli.main(["collect", "--prompts", str(env["prompts"]), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "embedded model is not installed" in err and "--model" in err, err
    assert not out.exists()


def test_mask_file_with_bits_past_d_in_is_malformed(tmp_path):
    from memloc.errors import MemlocError
    from memloc.localize import write_mask_file

    meta = {"model": {"layers": [{"name": "ffn", "d_out": 2, "d_in": 40}]}}
    clean = mk.pack_mask(torch.rand(1, 2, 40) < 0.5)
    write_mask_file(tmp_path / "clean.safetensors", [clean], meta)
    assert torch.equal(read_mask_file(tmp_path / "clean.safetensors").masks[0].words, clean.words)
    for bit in (8, 31):  # column 40, and the sign bit of the last word (column 63)
        words = clean.words.clone()
        words[0, 1, -1] |= torch.tensor(1 << bit).to(torch.int32)
        write_mask_file(tmp_path / f"dirty{bit}.safetensors", [mk.PackedMask(words, 40)], meta)
        with pytest.raises(MemlocError, match="layer ffn has bits set past column 39"):
            read_mask_file(tmp_path / f"dirty{bit}.safetensors")


def test_output_folders_are_replaced_only_when_memloc_wrote_them(env, tmp_path, capsys):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["analyze", "--stats", str(env["stats"]), "--out", str(out), "--subsets", "2", "--subset-size", "2"]
    assert cli.main(argv) == 2
    assert "holds files memloc did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder is taken
    assert cli.main(argv) == 0 and (out / ".memloc-output").is_file() and (out / "analysis.csv").is_file()
    assert cli.main(argv) == 0, "a folder memloc wrote is replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"], "a temporary folder was left behind"


def test_unavailable_backend_is_a_one_line_error(env, tmp_path, capsys):
    from memloc_kernels.backends.cuda import BACKEND

    if BACKEND.availability()[0]:
        pytest.skip("the cuda backend can run here")
    assert cli.main(_localize(env, tmp_path / "m.st", "--backend", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memloc localize: error: --backend: backend 'cuda' is not available") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["attack", "eval"])
def test_attack_and_eval_refuse_a_bad_mask_before_sampling(env, tmp_path, capsys, monkeypatch, command):
    import memloc.eval.attack
    import memloc.eval.compare

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started before the mask file was checked")

    monkeypatch.setattr(memloc.eval.attack, "attack_pipeline", no_sampling)
    monkeypatch.setattr(memloc.eval.compare, "evaluate_method", no_sampling)
    for model, mask, message in [(env["model"], env["stats"], "not a memloc mask file"),
                                 (env["other_weights"], env["mask"], "different model")]:
        out = tmp_path / command
        argv = [command, "--model", str(model), "--mask", str(mask), "--prompts", str(env["prompts"]),
                "--samples", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()
