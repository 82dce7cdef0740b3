"""Training data of the embedded model: procedural generic images, the attribute checker, the memorized photos."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from memloc.train.attributes import attribute_hits, detect
from memloc.train.measure import rmse
from memloc.train.shapes import (
    BACKGROUNDS,
    COLOURS,
    CaptionTable,
    attributes_dict,
    attributes_row,
    caption_for,
    render,
    sample_generic,
)

# one intra-op thread (conftest.py): the machines have 2 shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def test_generic_sampling_and_rendering_are_deterministic():
    a, b = sample_generic(64, seed=5), sample_generic(64, seed=5)
    for field in ("attrs", "centres", "radii", "colour_rgb", "background_rgb"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(render(a, 32), render(b, 32))
    c = sample_generic(64, seed=6)
    assert not torch.equal(a.attrs, c.attrs)
    assert not torch.equal(render(a, 32), render(c, 32))


def test_render_shape_dtype_and_colours():
    spec = sample_generic(16, seed=1)
    images = render(spec, 32)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    corner = images[:, :, 0, 0].float() / 255
    assert torch.allclose(corner, spec.background_rgb, atol=1 / 255 + 1e-6)


def test_caption_table_is_complete_and_unique():
    table = CaptionTable()
    assert len(table) == 6 * 3 * 5 * 3 + 2 * 6 * 3 * 3
    assert len(set(table.captions)) == len(table)
    spec = sample_generic(500, seed=2)
    idx = table.index(spec.attrs)
    for row, i in zip(spec.attrs.tolist(), idx.tolist()):
        assert table.captions[i] == caption_for(**attributes_dict(row))
        assert attributes_row(attributes_dict(row)) == tuple(row)


def test_caption_text():
    assert caption_for(1, "red", "circle", "left", "black") == "a red circle on the left on a black background"
    assert caption_for(3, "blue", "square", None, "gray") == "three blue squares on a gray background"


def test_eval_set_is_balanced_and_seeded():
    table = CaptionTable()
    ev = table.eval_set(per_count=8, seed=0)
    assert [e["attributes"]["count"] for e in ev].count(2) == 8
    assert ev == table.eval_set(per_count=8, seed=0)
    assert ev != table.eval_set(per_count=8, seed=1)


def test_sample_generic_with_given_attributes():
    rows = torch.tensor([[1, 0, 2, 3, 1], [3, 5, 1, 5, 2]])
    spec = sample_generic(2, seed=0, attrs=rows)
    assert torch.equal(spec.attrs, rows)
    with pytest.raises(ValueError, match="attrs must have shape"):
        sample_generic(3, seed=0, attrs=rows)


def test_checker_reads_rendered_attributes():
    spec = sample_generic(200, seed=3)
    images = render(spec, 32).permute(0, 2, 3, 1).numpy()
    hits = [attribute_hits(detect(im), attributes_dict(r)) for im, r in zip(images, spec.attrs.tolist())]
    for key in ("background", "colour", "count"):
        assert all(h[key] for h in hits), key
    assert all(h["position"] for h in hits if "position" in h)
    shape_acc = np.mean([h["shape"] for h in hits])
    assert shape_acc >= 0.97, shape_acc


@pytest.mark.parametrize("change", ["colour", "count", "background", "position"])
def test_checker_rejects_wrong_attributes(change):
    rows = torch.tensor([[1, 0, 0, 0, 0]] * 4)  # a red circle on the left on black
    images = render(sample_generic(4, seed=4, attrs=rows), 32).permute(0, 2, 3, 1).numpy()
    wrong = attributes_dict(rows[0].tolist())
    wrong[change] = {"colour": "blue", "count": 2, "background": "white", "position": "right"}[change]
    if change == "count":
        wrong["position"] = None
    for im in images:
        assert not attribute_hits(detect(im), wrong)[change]
        assert attribute_hits(detect(im), attributes_dict(rows[0].tolist()))["all"]


def test_checker_on_an_empty_image():
    blank = np.full((32, 32, 3), BACKGROUNDS["gray"], dtype=np.float32)
    found = detect(blank)
    assert found.count == 0 and found.background == "gray"
    assert not attribute_hits(found, {"count": 1, "colour": "red", "shape": "circle", "position": "left",
                                      "background": "gray"})["all"]


def test_palette_colours_are_distinct_from_backgrounds():
    for c, rgb in COLOURS.items():
        for b, bg in BACKGROUNDS.items():
            assert np.linalg.norm(np.subtract(rgb, bg)) > 0.4, (c, b)


def test_photos_load_offline_and_are_distinct(monkeypatch):
    pytest.importorskip("skimage")
    from memloc.train.photos import PHOTOS, load_photos

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    specs, photos = load_photos(32)
    assert len(specs) == len(PHOTOS) and 20 <= len(specs) <= 40
    assert photos.shape == (len(specs), 32, 32, 3) and photos.dtype == np.uint8
    assert len({s.caption for s in specs}) == len(specs)
    table = set(CaptionTable().captions)
    assert not table & {s.caption for s in specs}
    floats = photos.astype(np.float32) / 255
    d = np.stack([rmse(floats, p) for p in floats])
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0.15, d.min()
    generic = render(sample_generic(2000, seed=0), 32).permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    to_generic = min(rmse(generic, p).min() for p in floats)
    assert to_generic > 0.15, to_generic
    _, again = load_photos(32)
    assert np.array_equal(photos, again)
