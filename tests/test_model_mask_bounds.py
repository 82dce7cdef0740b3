"""benchmarks/model_mask_bounds.py: the block counts it reports obey the bounds' algebra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from model_mask_bounds import blocks_reaching, main  # noqa: E402


@pytest.mark.parametrize("width", [8, 4])
def test_bound_lists_every_block_the_exact_maxima_list(width):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(16, 1280, generator=g) * 0.02).half()
    norms = torch.exp(torch.randn(1280, generator=g) * 0.75) * 30
    k = 12
    got = blocks_reaching(weight, norms, k, width)
    # the k largest scores lie in at least k / width and at most k blocks; the bound reaches s_k in
    # every block whose exact maximum does, and with spread-out norms in more
    assert (got["exact"] >= -(-k // width)).all() and (got["exact"] <= k).all()
    assert (got["bound"] >= got["exact"]).all()
    assert (got["bound"] > got["exact"]).any()


def test_equal_norms_make_the_bound_exact():
    weight = (torch.randn(8, 512, generator=torch.Generator().manual_seed(1)) * 0.02).half()
    got = blocks_reaching(weight, torch.full((512,), 3.0), 5, 8)
    assert torch.equal(got["bound"], got["exact"])


def test_main_prints_the_table(capsys):
    assert main(["--rows", "8", "--d-in", "1280", "--vectors", "2"]) == 0
    out = capsys.readouterr().out
    assert "bound mean" in out and out.count("\n") == 6
