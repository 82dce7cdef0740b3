"""Memorization measurement: distances, near-copy rates, attribute accuracy and diversity, on stub pipelines."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memloc.errors import MemlocError
from memloc.train.manifest import Manifest, read_manifest, write_manifest
from memloc.train.measure import diversity, generate, measure, memorized_stats, rmse
from memloc.train.shapes import CaptionTable, attributes_row, render, sample_generic

# one intra-op thread (conftest.py): the machines have 2 shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def _photos(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
    return base.repeat(4, axis=1).repeat(4, axis=2)


class StubPipe:
    """Stands in for a StableDiffusionPipeline: memorized captions give their photo (plus seeded noise of
    ``noise`` RMSE), generic captions give a fresh render with the caption's attributes, other text noise."""

    def __init__(self, manifest: Manifest, noise: float = 0.03, memorizes: bool = True, follows_captions: bool = True):
        self.photos = {m["caption"]: manifest.photos[i] for i, m in enumerate(manifest.memorized)}
        table = CaptionTable()
        self.rows = {c: r for c, r in zip(table.captions, table.rows)}
        self.noise, self.memorizes, self.follows = noise, memorizes, follows_captions
        self.calls = []

    def __call__(self, prompt, generator, num_inference_steps, guidance_scale, output_type):
        assert output_type == "np" and len(prompt) == len(generator)
        self.calls.append(len(prompt))
        out = []
        for caption, gen in zip(prompt, generator):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            rng = np.random.default_rng(seed)
            if caption in self.photos and self.memorizes:
                img = self.photos[caption] / 255.0 + rng.normal(0, self.noise, (32, 32, 3))
            elif caption in self.rows and self.follows:
                spec = sample_generic(1, seed=seed, attrs=torch.tensor([self.rows[caption]]))
                img = render(spec, 32)[0].permute(1, 2, 0).numpy() / 255.0
            else:
                img = rng.random((32, 32, 3))
            out.append(np.clip(img, 0, 1).astype(np.float32))
        return SimpleNamespace(images=np.stack(out))


@pytest.fixture()
def manifest():
    photos = _photos()
    return Manifest(
        image_size=32,
        near_copy_rmse=0.1,
        memorized=[{"caption": f"memorized photo number {w}"} for w in ("one", "two", "three", "four")],
        photos=photos,
        generic_eval=CaptionTable().eval_set(per_count=2, seed=0),
    )


def test_rmse_and_diversity():
    a = np.full((2, 8, 8, 3), 0.5, dtype=np.float32)
    assert rmse(a, a[0]) == pytest.approx([0.0, 0.0])
    assert rmse(a + 0.05, a[0]) == pytest.approx([0.05, 0.05], abs=1e-6)
    assert diversity(a) == 0.0
    b = a.copy()
    b[1] += 0.2
    assert diversity(b) == pytest.approx(0.2, abs=1e-6)


def test_memorized_stats_separates_copies_from_other_images():
    photos = _photos().astype(np.float32) / 255
    rng = np.random.default_rng(1)
    copies = photos[:, None] + rng.normal(0, 0.02, (4, 5, 32, 32, 3))
    stats = memorized_stats(np.clip(copies, 0, 1), photos)
    assert stats["near_copy_rate"] == 1.0 and stats["nearest_is_own"] == 1.0
    assert stats["captions_majority_copied"] == 1.0 and stats["mean_rmse"] < 0.03
    swapped = memorized_stats(np.clip(copies[::-1], 0, 1), photos)
    assert swapped["near_copy_rate"] == 0.0 and swapped["nearest_is_own"] == 0.0


def test_memorized_stats_resizes_to_photo_size():
    photos = _photos(2, 32)
    big = photos.repeat(2, axis=1).repeat(2, axis=2).astype(np.float32)[:, None] / 255
    assert memorized_stats(big, photos)["near_copy_rate"] == 1.0


def test_generate_is_per_seed_deterministic(manifest):
    pipe = StubPipe(manifest)
    caps = manifest.captions[:2]
    a = generate(pipe, caps, [3, 4, 5], batch_size=4, progress=False)
    b = generate(pipe, caps, [5, 4, 3], batch_size=1, progress=False)
    assert a.shape == (2, 3, 32, 32, 3)
    assert np.array_equal(a[:, 0], b[:, 2]) and np.array_equal(a[:, 2], b[:, 0])
    assert pipe.calls[:2] == [4, 2]


def test_measure_on_a_memorizing_pipeline(manifest):
    result = measure(StubPipe(manifest), manifest, seeds=range(4), progress=False)
    mem, gen = result["memorized"], result["generic"]
    assert mem["near_copy_rate"] == 1.0 and len(mem["per_caption"]) == 4
    assert mem["per_caption"][2]["caption"] == manifest.captions[2]
    assert gen["attribute_accuracy"]["all"] >= 0.9
    assert gen["diversity_rmse"] > 0.05 and gen["photo_copy_rate"] == 0.0
    assert result["images"]["memorized"].shape == (4, 4, 32, 32, 3)


def test_measure_on_a_pipeline_that_does_not_memorize(manifest):
    result = measure(StubPipe(manifest, memorizes=False, follows_captions=False), manifest, seeds=range(3),
                     progress=False)
    assert result["memorized"]["near_copy_rate"] == 0.0
    assert result["generic"]["attribute_accuracy"]["all"] < 0.3


def test_measure_held_out_subset(manifest):
    result = measure(StubPipe(manifest, noise=0.2), manifest, seeds=range(3), memorized=[1, 3], progress=False)
    mem = result["memorized"]
    assert [p["index"] for p in mem["per_caption"]] == [1, 3]
    assert mem["near_copy_rate"] == 0.0 and mem["mean_rmse"] > 0.15


def test_manifest_round_trip(tmp_path, manifest):
    write_manifest(tmp_path, manifest)
    back = read_manifest(tmp_path)
    assert np.array_equal(back.photos, manifest.photos)
    assert back.captions == manifest.captions and back.generic_eval == manifest.generic_eval
    assert [attributes_row(g["attributes"]) for g in back.generic_eval]


def test_manifest_errors(tmp_path, manifest):
    with pytest.raises(MemlocError, match="not trained by memloc train"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="4 memorized captions but 3 photos"):
        write_manifest(tmp_path, Manifest(32, 0.1, manifest.memorized, manifest.photos[:3]))
