"""`memloc demo` on the embedded model: memorization measured, removed on held-out captions, quality kept."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import memloc_kernels as mk
from memloc.cli import main
from memloc.demo import (
    REMOVED_FRACTION,
    SPARSITY_CANDIDATES,
    memorization_reduced,
    random_masks_like,
    run_demo,
    split_captions,
    verdict,
)
from memloc.pipeline import DEFAULT_MODEL
from memloc.stats import read_stats_metadata

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model_index.json").is_file(),
    reason=f"the embedded model is not installed ({DEFAULT_MODEL} has no model_index.json)",
)

# Margins of the assertions (stated here, checked against measurements of the run below):
# - before pruning, a memorized caption's generations must be near copies (pixel RMSE < 0.1 on a 0-1
#   scale) of its photo at a rate COPY_GAP above the rate at which generic captions copy any photo;
# - "measurably less" after pruning: the held-out near-copy rate falls by RATE_DROP or the mean RMSE
#   to the training photo rises by RMSE_RISE; pruning as many random weights must not pass this;
# - generic all-attribute accuracy may fall by at most QUALITY_MARGIN. At the demo's defaults pruning
#   costs about 0.18 of it (docs/DEMO.md: the full CPU run, 0.969 -> 0.792), more than the 0.15 the
#   demo's verdict allows, so this is a guard against worse damage, not a claim that quality is kept;
# - on the localization half itself, at most IN_SAMPLE_FRACTION of the near copies may remain.
COPY_GAP = 0.15
RATE_DROP = 0.25
RMSE_RISE = 0.05
QUALITY_MARGIN = 0.3
IN_SAMPLE_FRACTION = 0.5
# A reduced demo at the default s, tau and 20 DDIM steps: 4 seeds for the first 8 held-out captions,
# 2 for the first 8 localization-half captions and 8 generic ones (statistics use the whole
# localization half); about 90 s on one CPU thread.
REDUCED = dict(seeds=4, generic_seeds=2, steps=20, max_captions=8, max_generic=8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One reduced demo run, on one thread (two spinning OpenMP threads are slow on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("demo") / "out"
        record = run_demo(out, device="cpu", dtype="float32", progress=False, **REDUCED)
    finally:
        torch.set_num_threads(threads)
    return out, record


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--out",
        "--device",
        "--dtype",
        "--backend",
        "--seeds",
        "--sparsity",
        "--timesteps",
        "--steps",
        "--guidance",
        "--quick",
    ):
        assert flag in text, f"{flag} missing from memloc demo --help"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "lots"], "--sparsity must be a number"),
        (["--sparsity", "0"], "--sparsity must be in (0, 1]"),
        (["--seeds", "2"], "--seeds must be >= 3"),
        (["--timesteps", "20"], "--timesteps (tau) must be in 0..19"),
    ],
    ids=["sparsity-not-a-number", "sparsity-zero", "too-few-seeds", "tau-beyond-steps"],
)
def test_bad_options_fail_with_one_line(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_split_keeps_sources_together_and_is_balanced():
    memorized = [{"caption": f"c{i}", "source": f"photo{g}"} for i, g in enumerate([0, 0, 0, 1, 1, 2, 3, 3, 4, 5])]
    loc, held = split_captions(memorized, seed=0)
    assert sorted(loc + held) == list(range(10)) and not set(loc) & set(held)
    assert abs(len(loc) - len(held)) <= 1
    sources = lambda idx: {memorized[i]["source"] for i in idx}
    assert not sources(loc) & sources(held)
    assert split_captions(memorized, seed=0) == (loc, held)
    assert any(split_captions(memorized, seed=s) != (loc, held) for s in range(1, 6)), "the seed does nothing"


def test_random_masks_have_the_requested_counts():
    shapes, counts = [(3, 40), (5, 7)], [11, 35]
    masks = random_masks_like(counts, shapes, seed=1)
    for m, c, shape in zip(masks, counts, shapes):
        bits = mk.unpack_mask(m)
        assert tuple(bits.shape) == shape and int(bits.sum()) == c
    again = random_masks_like(counts, shapes, seed=1)
    assert all(torch.equal(a.words, b.words) for a, b in zip(masks, again))


def test_outputs_are_written(demo):
    out, record = demo
    for name in (
        "table.md",
        "demo.json",
        "grid.png",
        "grid_generic.png",
        "attack_per_prompt.csv",
        "stats.safetensors",
        "mask.safetensors",
        "analysis/density.png",
        "analysis/iou.png",
    ):
        assert (out / name).is_file(), f"{name} was not written"
    written = json.loads((out / "demo.json").read_text())
    assert (
        written["results"]["pruned"]["held_out"]["near_copy_rate"]
        == record["results"]["pruned"]["held_out"]["near_copy_rate"]
    )
    assert "pruned (memloc)" in (out / "table.md").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"


def test_statistics_use_only_the_localization_half(demo):
    out, record = demo
    prompts = read_stats_metadata(out / "stats.safetensors")["prompts"]
    localization = [c["caption"] for c in record["split"]["localization"]]
    held_out = [c["caption"] for c in record["split"]["held_out"]]
    assert prompts == localization
    assert not set(prompts) & set(held_out)


def test_memorized_captions_reproduce_photos_and_generic_captions_do_not(demo):
    _, record = demo
    original = record["results"]["original"]
    generic = original["generic"]
    for half in ("held_out", "localization"):
        mem = original[half]
        # a generic caption's generation is (almost) never a near copy of any photo; memorized ones often are
        assert mem["near_copy_rate"] >= generic["photo_copy_rate"] + COPY_GAP, (half, mem, generic["photo_copy_rate"])
        assert mem["mean_rmse"] < generic["mean_rmse_to_nearest_photo"], (half, mem["mean_rmse"])
        # chance for "the nearest of 32 photos is the caption's own" is 1/32
        assert mem["nearest_is_own"] >= 0.5, (half, mem["nearest_is_own"])
        # the seeds of a memorized caption agree with each other more than those of a generic caption
        assert mem["diversity_rmse"] < generic["diversity_rmse"], (half, mem["diversity_rmse"])


def test_pruning_reduces_held_out_memorization_measurably_and_bounds_quality_loss(demo):
    """Measurably less copying of held-out photos (not necessarily removal: the demo's verdict judges that)."""
    _, record = demo
    original, pruned = record["results"]["original"], record["results"]["pruned"]
    assert memorization_reduced(
        original["held_out"], pruned["held_out"], min_rate_drop=RATE_DROP, min_rmse_rise=RMSE_RISE
    ), (
        original["held_out"]["near_copy_rate"],
        pruned["held_out"]["near_copy_rate"],
        original["held_out"]["mean_rmse"],
        pruned["held_out"]["mean_rmse"],
    )
    acc_before = original["generic"]["attribute_accuracy"]["all"]
    acc_after = pruned["generic"]["attribute_accuracy"]["all"]
    assert acc_before - acc_after <= QUALITY_MARGIN, (acc_before, acc_after)
    assert record["pruned_weights"] == sum(layer["pruned"] for layer in record["pruned_per_layer"]) > 0


def test_pruning_removes_memorization_of_the_localization_half(demo):
    """In-sample: the captions the masks were computed on lose most of their near copies."""
    _, record = demo
    before = record["results"]["original"]["localization"]
    after = record["results"]["pruned"]["localization"]
    rates = (before["near_copy_rate"], after["near_copy_rate"])
    assert after["near_copy_rate"] <= IN_SAMPLE_FRACTION * before["near_copy_rate"], rates
    assert after["mean_rmse"] >= before["mean_rmse"] + RMSE_RISE, (before["mean_rmse"], after["mean_rmse"])


def test_random_pruning_of_as_many_weights_does_not_pass_the_check(demo):
    """The same check on the control: pruning as many random weights per layer leaves the memorization."""
    _, record = demo
    original, control = record["results"]["original"], record["results"]["random"]
    assert control["pruned_weights"] == record["results"]["pruned"]["pruned_weights"]
    assert not memorization_reduced(
        original["held_out"], control["held_out"], min_rate_drop=RATE_DROP, min_rmse_rise=RMSE_RISE
    ), (original["held_out"], control["held_out"])


def test_verdict_reports_failure_when_pruning_changes_nothing(demo):
    _, record = demo
    results = copy.deepcopy(record["results"])
    results["pruned"] = copy.deepcopy(results["original"])
    conclusion = verdict(results)
    assert conclusion["removed"] is False and conclusion["quality_kept"] is True
    assert conclusion["message"].startswith("pruning did NOT remove memorization on held-out captions")
    assert record["verdict"]["message"] in record["table"]
    original, pruned = record["results"]["original"], record["results"]["pruned"]
    drop = original["generic"]["attribute_accuracy"]["all"] - pruned["generic"]["attribute_accuracy"]["all"]
    assert record["verdict"]["quality_kept"] == (drop <= record["verdict"]["quality_margin"])


def test_attack_finds_the_held_out_prompts_memorized_before_pruning(demo):
    _, record = demo
    before = record["results"]["original"]["attack"]
    assert before["prompts"] == len(record["split"]["measured_held_out"])
    assert before["actually_memorized"] >= before["prompts"] // 2, before
    assert all(r["model"] == "original" for r in before["per_prompt"])
    for model in record["results"].values():
        attack = model["attack"]
        assert attack["actually_memorized"] <= attack["identified"] <= attack["prompts"]


def test_sparsity_auto_applies_its_rule_on_the_localization_half(tmp_path):
    """--sparsity auto: the first candidate that brings the localization half to the bar, measured there only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = run_demo(
            tmp_path / "out",
            device="cpu",
            dtype="float32",
            progress=False,
            sparsity="auto",
            seeds=3,
            generic_seeds=2,
            steps=5,
            max_captions=2,
            max_generic=2,
            random_control=False,
            analysis=False,
        )
    finally:
        torch.set_num_threads(threads)
    sweep = record["sparsity_sweep"]
    assert [row["sparsity"] for row in sweep] == list(SPARSITY_CANDIDATES[: len(sweep)])
    target = REMOVED_FRACTION * record["results"]["original"]["localization"]["near_copy_rate"]
    passed = [row for row in sweep if row["near_copy_rate"] <= target]
    if passed:
        assert passed == sweep[-1:] and record["config"]["sparsity"] == sweep[-1]["sparsity"]
    else:
        assert len(sweep) == len(SPARSITY_CANDIDATES)
        assert (
            record["config"]["sparsity"] == min(sweep, key=lambda r: (r["near_copy_rate"], r["sparsity"]))["sparsity"]
        )
    assert record["config"]["sparsity_rule"] == "auto"
    assert "random" not in record["results"]
