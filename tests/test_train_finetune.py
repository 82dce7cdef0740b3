"""``memloc train --finetune``: an existing pipeline fine-tuned on an image folder with chosen images duplicated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from memloc.cli import main
from memloc.errors import MemlocError
from memloc.train.finetune import FinetuneOptions, choose_duplicated, read_image_folder
from memloc.train.manifest import read_manifest
from memloc.train.shapes import render, sample_generic

# one intra-op thread (conftest.py): the machines have 2 shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    images = render(sample_generic(6, seed=0), 24).permute(0, 2, 3, 1).numpy()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img_{i}.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img_0.png", "text": "the first picture"}) + "\n"
        + json.dumps({"file_name": "img_1.png", "text": "the second picture"}) + "\n"
    )
    (folder / "img_2.txt").write_text("a caption from a text file\n")
    (folder / "notes.md").write_text("not an image")
    return folder


@pytest.fixture()
def base_model(tmp_path):
    from memloc.tiny import build_tiny_pipeline, write_char_tokenizer

    tok = write_char_tokenizer(tmp_path / "tok")
    pipe = build_tiny_pipeline(tok, seed=0, channels=(16, 16, 32, 32), cross_attention_dim=32, sample_size=8)
    pipe.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_read_image_folder_captions(image_folder):
    files, captions = read_image_folder(image_folder)
    assert [f.name for f in files] == [f"img_{i}.png" for i in range(6)]
    assert captions[:4] == ["the first picture", "the second picture", "a caption from a text file", "img 3"]


def test_choose_duplicated(image_folder, tmp_path):
    files, _ = read_image_folder(image_folder)
    opts = FinetuneOptions(model="m", images=str(image_folder), duplicate_images=3, seed=1)
    chosen = choose_duplicated(files, opts)
    assert len(chosen) == 3 and chosen == sorted(set(chosen)) and chosen == choose_duplicated(files, opts)
    listing = tmp_path / "dup.txt"
    listing.write_text("img_4.png\nimg_1.png\n")
    opts.duplicate_list = str(listing)
    assert choose_duplicated(files, opts) == [1, 4]
    listing.write_text("missing.png\n")
    with pytest.raises(MemlocError, match="not in --images"):
        choose_duplicated(files, opts)
    opts.duplicate_list, opts.duplicate_images = None, 7
    with pytest.raises(MemlocError, match="exceeds the 6 images"):
        choose_duplicated(files, opts)


def test_finetune_end_to_end(base_model, image_folder, tmp_path):
    out, report_dir = tmp_path / "tuned", tmp_path / "report"
    code = main([
        "train", "--finetune", "--model", str(base_model), "--images", str(image_folder), "--out", str(out),
        "--report-dir", str(report_dir), "--duplicate", "5", "--duplicate-images", "2", "--max-steps", "6",
        "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "3", "--eval-seeds", "2",
        "--eval-steps", "2", "--device", "cpu",
    ])
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["errors"] == []
    assert report["data"] == {"images": 6, "duplicated": 2, "duplicate": 5, "dataset_rows": 4 + 2 * 5,
                              "resolution": 16}
    assert report["unet"]["steps"] == 6
    assert set(report["measurement"]) >= {"duplicated", "not_duplicated"}
    assert report["measurement"]["duplicated"]["captions"] == 2
    manifest = read_manifest(out)
    assert len(manifest.memorized) == 2 and manifest.photos.shape == (2, 64, 64, 3)
    assert all(m["file"].startswith("img_") for m in manifest.memorized)
    assert (report_dir / "loss.png").exists() and (report_dir / "samples.png").exists()

    from memloc.train.models import load_pipeline

    tuned, base = load_pipeline(out), load_pipeline(base_model)
    changed = [not torch.allclose(a.float(), b.float(), atol=1e-3)
               for a, b in zip(tuned.unet.parameters(), base.unet.parameters())]
    assert any(changed)
    assert all(torch.equal(a.half(), b.half()) for a, b in zip(tuned.vae.parameters(), base.vae.parameters()))
    img = tuned(manifest.captions[0], num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
