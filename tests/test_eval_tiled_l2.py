"""Carlini et al.'s tiled L2 distance: hand-computed examples, a float64 loop oracle, units."""

import math

import numpy as np
import pytest

from memloc.eval.tiled_l2 import PAPER_THRESHOLD, threshold_from_tile_l2, tile_bounds, tiled_l2


def test_hand_computed_4x4_grid_2():
    # a 4x4 gray image cut into four 2x2 tiles; b differs from a (zeros) tile by tile:
    #   top-left  [10 10 / 10 10] -> RMS sqrt(4 * 100 / 4)      = 10
    #   top-right [ 0  0 /  0 20] -> RMS sqrt(400 / 4)          = 10
    #   bot-left  [30  0 /  0  0] -> RMS sqrt(900 / 4)          = 15   <- the worst tile
    #   bot-right [ 6  8 /  0  0] -> RMS sqrt((36 + 64) / 4)    = 5
    a = np.zeros((4, 4, 1), dtype=np.uint8)
    b = np.array(
        [
            [10, 10, 0, 0],
            [10, 10, 0, 20],
            [30, 0, 6, 8],
            [0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )[:, :, None]
    d = tiled_l2(a, b, grid=2)
    assert d.shape == (1, 1)
    assert d.item() == pytest.approx(15.0, abs=1e-12)
    # the whole-image RMS would call them closer: sqrt(1800 / 16) = 10.61
    assert tiled_l2(a, b, grid=1).item() == pytest.approx(math.sqrt(1800 / 16), abs=1e-12)
    assert tiled_l2(b, a, grid=2).item() == pytest.approx(15.0, abs=1e-12)


def test_hand_computed_uneven_tiles_and_channels():
    # 5x5 with grid 2: rows/cols split [0, 2) and [2, 5); the bottom-right tile has 3 x 3 pixels x 3 channels
    assert tile_bounds(5, 2) == [(0, 2), (2, 5)]
    a = np.zeros((5, 5, 3), dtype=np.uint8)
    b = a.copy()
    b[4, 4] = (12, 0, 0)  # one value of 27 in its tile: RMS sqrt(144 / 27)
    assert tiled_l2(a, b, grid=2).item() == pytest.approx(math.sqrt(144 / 27), abs=1e-12)
    b[0, 0] = (9, 9, 9)  # top-left tile has 2 x 2 x 3 = 12 values: RMS sqrt(243 / 12) = 4.5
    assert tiled_l2(a, b, grid=2).item() == pytest.approx(4.5, abs=1e-12)


def _loop_oracle(a: np.ndarray, b: np.ndarray, grid: int) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    h, w = a.shape[1:3]
    for i in range(len(a)):
        for j in range(len(b)):
            worst = 0.0
            for ty in range(grid):
                for tx in range(grid):
                    y0, y1 = h * ty // grid, h * (ty + 1) // grid
                    x0, x1 = w * tx // grid, w * (tx + 1) // grid
                    diff = a[i, y0:y1, x0:x1].astype(np.float64) - b[j, y0:y1, x0:x1].astype(np.float64)
                    worst = max(worst, math.sqrt((diff**2).mean()))
            out[i, j] = worst
    return out


@pytest.mark.parametrize(
    "shape,grid",
    [((16, 16, 3), 4), ((13, 7, 3), 3), ((9, 9, 1), 1), ((32, 24, 3), 4)],
    ids=["16x16-g4", "13x7-g3", "9x9-g1", "32x24-g4"],
)
def test_matches_loop_oracle(shape, grid):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
    b = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
    got = tiled_l2(a, b, grid=grid).numpy()
    np.testing.assert_allclose(got, _loop_oracle(a, b, grid), rtol=1e-12, atol=1e-9)
    within = tiled_l2(a, grid=grid).numpy()
    np.testing.assert_allclose(within, _loop_oracle(a, a, grid), rtol=1e-12, atol=1e-9)
    assert np.all(np.diag(within) == 0)
    np.testing.assert_allclose(within, within.T, rtol=0, atol=0)


def test_near_copies_fall_under_the_paper_threshold():
    rng = np.random.default_rng(2)
    base = rng.integers(20, 236, (32, 32, 3))
    copies = np.clip(base[None] + rng.integers(-6, 7, (3, 32, 32, 3)), 0, 255).astype(np.uint8)
    others = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    d = tiled_l2(np.concatenate([copies, others])).numpy()
    from_others = d[3:][~np.eye(6, dtype=bool)[3:]]  # every pair that involves an unrelated image
    assert d[:3, :3].max() < PAPER_THRESHOLD < from_others.min()


def test_threshold_units():
    # the paper's 50 read as the unnormalized L2 of a 128x128x3 tile on a 0..1 scale
    assert threshold_from_tile_l2(50) == pytest.approx(50 / math.sqrt(128 * 128 * 3) * 255)
    assert threshold_from_tile_l2(50, value_scale=255.0) == pytest.approx(50 / math.sqrt(128 * 128 * 3))
    # L2 2 over 4 values on a -1..1 scale: RMS 1, half the range, 127.5 levels
    assert threshold_from_tile_l2(2.0, tile_values=4, value_scale=2.0) == pytest.approx(127.5)


@pytest.mark.parametrize(
    "a,b,grid",
    [
        (np.zeros((4, 4)), None, 2),
        (np.zeros((2, 4, 4, 3)), np.zeros((1, 5, 4, 3)), 2),
        (np.zeros((1, 4, 4, 3)), None, 5),
        (np.zeros((1, 4, 4, 3)), None, 0),
    ],
    ids=["2d", "size-mismatch", "grid-too-big", "grid-zero"],
)
def test_bad_inputs_raise(a, b, grid):
    with pytest.raises(ValueError):
        tiled_l2(a, b, grid=grid)
