"""The extraction attack on synthetic generations with planted near-duplicates, and on a tiny pipeline."""

import numpy as np
import pytest
from PIL import Image

from memloc.eval.attack import AttackConfig, analyze_prompt, attack_pipeline
from memloc.eval.loading import ImageFolder
from memloc.eval.report import table1_rows

K, SIZE = 10, 32

pytestmark = pytest.mark.usefixtures("one_thread")


def _near_copies(rng, base: np.ndarray, n: int) -> np.ndarray:
    return np.clip(base[None].astype(int) + rng.integers(-6, 7, (n, *base.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """8 prompts x 10 generations; prompts 1, 4, 6 hold a 4-clique of near copies, others do not."""
    rng = np.random.default_rng(7)
    bases = rng.integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.uint8)
    generations = []
    for p in range(8):
        images = rng.integers(0, 256, (K, SIZE, SIZE, 3)).astype(np.uint8)
        if p in (1, 4, 6):
            images[[0, 3, 5, 8]] = _near_copies(rng, bases[p], 4)
        if p == 3:  # a pair is no clique of 3
            images[[2, 7]] = _near_copies(rng, bases[p], 2)
        if p == 7:  # three copies, but one differs in a single 8x8 tile: only the tiled distance notices
            images[[1, 4, 9]] = _near_copies(rng, bases[p], 3)
            images[9, 8:16, 16:24] = rng.integers(0, 256, (8, 8, 3))
        generations.append(images)
    folder = tmp_path_factory.mktemp("training")
    for p in (1, 4):  # 6 is memorized by the model but its image is not among the known training images
        Image.fromarray(bases[p]).save(folder / f"train_{p}.png")
    for j in range(3):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)).save(folder / f"other_{j}.png")
    return generations, ImageFolder(folder)


def test_finds_exactly_the_planted_prompts(planted):
    generations, training = planted
    rows = [analyze_prompt(images, training=training) for images in generations]
    identified = {p for p, r in enumerate(rows) if r["identified"]}
    assert identified == {1, 4, 6}
    assert {p for p, r in enumerate(rows) if r["actually_memorized"]} == {1, 4}
    for p in (1, 4, 6):
        assert rows[p]["clique"] == [0, 3, 5, 8] and rows[p]["max_clique"] == 4
        assert rows[p]["medoid"] in (0, 3, 5, 8)
    assert rows[1]["nearest_training"] == "train_1.png" and rows[4]["nearest_training"] == "train_4.png"
    assert rows[3]["max_clique"] == 2 and rows[7]["max_clique"] == 2
    assert rows[0]["actually_memorized"] is False and rows[0]["nearest_training"] is None


def test_min_clique_and_threshold_change_the_verdict(planted):
    generations, _ = planted
    assert analyze_prompt(generations[3], min_clique=2)["identified"]
    assert not analyze_prompt(generations[1], min_clique=5)["identified"]
    assert not analyze_prompt(generations[1], threshold=1.0)["identified"]
    # without training images, 'actually memorized' is unknown, not false
    assert analyze_prompt(generations[1])["actually_memorized"] is None


def test_table1_layout(planted):
    generations, training = planted
    before = [analyze_prompt(images, training=training) for images in generations]
    after = [analyze_prompt(images, training=training) for images in generations[:1] * 8]
    rows = table1_rows({"before pruning": before, "after pruning": after}, with_training=True)
    assert rows == [
        {"model": "before pruning", "prompts": 8, "samples_per_prompt": K, "identified": 3, "actually_memorized": 2},
        {"model": "after pruning", "prompts": 8, "samples_per_prompt": K, "identified": 0, "actually_memorized": 0},
    ]
    assert table1_rows({"model": before}, with_training=False)[0]["actually_memorized"] is None


def test_config_validation():
    with pytest.raises(ValueError, match="samples"):
        AttackConfig(samples=1)
    with pytest.raises(ValueError, match="min_clique"):
        AttackConfig(min_clique=1)


def test_attack_on_tiny_pipeline(tiny_pipe, tmp_path):
    prompts = ["a red square", "the starry night"]
    training_dir = tmp_path / "train"
    training_dir.mkdir()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(training_dir / "gray.png")
    training = ImageFolder(training_dir)
    # every pair is an edge under a huge threshold: all prompts identified, each clique saved
    loose = AttackConfig(samples=3, steps=1, threshold=1e4, batch_size=6)
    cliques = tmp_path / "cliques"
    rows = attack_pipeline(tiny_pipe, prompts, loose, training=training, clique_dir=cliques, progress=False)
    assert [r["identified"] for r in rows] == [True, True]
    assert [r["actually_memorized"] for r in rows] == [True, True]
    assert all(r["max_clique"] == 3 and r["detection"] > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "cliques").iterdir()) == ["0000.png", "0001.png"]
    assert rows[1]["medoid_seed"] in (3, 4, 5)  # prompt 1's seeds
    # under a tiny threshold nothing is identified, and the same seeds give the same distances
    strict = AttackConfig(samples=3, steps=1, threshold=1e-6, batch_size=6)
    again = attack_pipeline(tiny_pipe, prompts, strict, progress=False)
    assert not any(r["identified"] for r in again)
    assert [r["min_pair_distance"] for r in again] == [r["min_pair_distance"] for r in rows]
