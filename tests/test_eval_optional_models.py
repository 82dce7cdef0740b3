"""Optional measuring models (SSCD, CLIP, Inception, attributes, mask driver): clear messages when absent."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from memloc.errors import MemlocError
from memloc.eval.loading import EMBEDDED_MODEL, ImageFolder, load_pipeline, read_prompts
from memloc.eval.masks import apply_mask_file, driver_apply
from memloc.eval.quality import AttributeChecker, ClipScorer, InceptionFeatures, feature_stats, frechet_distance
from memloc.eval.sscd import SSCD

CPU = torch.device("cpu")


def _images(seed: int, n: int = 4, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


# --- SSCD -------------------------------------------------------------------------------------------


class _FakeSSCD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def test_sscd_messages(tmp_path):
    with pytest.raises(MemlocError, match="SSCD model file .*--sscd"):
        SSCD(None)
    with pytest.raises(MemlocError, match="does not exist"):
        SSCD(tmp_path / "sscd_disc_large.torchscript.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(MemlocError, match="not a TorchScript SSCD model"):
        SSCD(garbage)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is not None, reason="onnxruntime is installed")
def test_sscd_onnx_without_onnxruntime(tmp_path):
    model = tmp_path / "sscd.onnx"
    model.write_bytes(b"\x08\x07")
    with pytest.raises(MemlocError, match="needs onnxruntime"):
        SSCD(model)


def test_sscd_torchscript_similarity(tmp_path):
    path = tmp_path / "fake_sscd.torchscript.pt"
    torch.jit.script(_FakeSSCD()).save(str(path))
    sscd = SSCD(path, CPU)
    a, b = _images(0), _images(1)
    sim = sscd.similarity(a, b)
    assert sim.shape == (4, 4) and torch.all(sim.abs() <= 1 + 1e-6)
    torch.testing.assert_close(torch.diagonal(sscd.similarity(a, a)), torch.ones(4), rtol=0, atol=1e-5)


# --- CLIP score -------------------------------------------------------------------------------------


def test_clip_messages(tmp_path):
    with pytest.raises(MemlocError, match="CLIP score needs a local CLIP model folder.*--clip-model"):
        ClipScorer(None)
    with pytest.raises(MemlocError, match="no config.json"):
        ClipScorer(tmp_path / "clip")


def test_clip_score_on_a_tiny_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from memloc.tiny import write_char_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(tmp_path / "tok")))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    folder = tmp_path / "clip"
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))

    images, prompts = _images(2, n=3, size=40), ["a cat", "two red squares", "the sea"]
    scores = ClipScorer(folder, CPU).score(images, prompts)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
        expected = (torch.diagonal(out.logits_per_image) / model.logit_scale.exp()).double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


# --- FID --------------------------------------------------------------------------------------------


class _FakeInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299:
            raise ValueError("expected uint8 [N, 3, 299, 299]")
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


def test_inception_messages(tmp_path):
    with pytest.raises(MemlocError, match="FID needs Inception weights.*--inception"):
        InceptionFeatures(None)
    with pytest.raises(MemlocError, match="does not exist"):
        InceptionFeatures(tmp_path / "inception-2015-12-05.pt")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a model")
    with pytest.raises(MemlocError, match="neither TorchScript nor a weights file"):
        InceptionFeatures(garbage)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_inception_state_dict_without_torchvision(tmp_path):
    weights = tmp_path / "inception_v3_google.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(MemlocError, match="needs torchvision"):
        InceptionFeatures(weights)


def test_fid_with_a_torchscript_feature_network(tmp_path):
    path = tmp_path / "fake_inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    features = InceptionFeatures(path, CPU)
    a = features(_images(3, n=20))
    b = features(np.clip(_images(3, n=20).astype(int) + 60, 0, 255).astype(np.uint8))
    assert a.shape == (20, 12)
    assert abs(frechet_distance(*feature_stats(a), *feature_stats(a))) < 1e-9
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) > 1e-3


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(
        4 + 4 + 9 - 2 * 6
    )
    # diagonal covariances: a sum of 1-D terms
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 2.0, 3.0]), np.array([4.0, 2.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # general covariances against scipy's matrix square root
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = x @ x.T, y @ y.T
    reference = np.trace(c1 + c2 - 2 * np.real(linalg.sqrtm(c1 @ c2)))
    assert frechet_distance(np.zeros(6), c1, np.zeros(6), c2) == pytest.approx(reference, rel=1e-6)


def test_feature_stats_needs_two_images():
    with pytest.raises(MemlocError, match="at least 2 images"):
        feature_stats(np.zeros((1, 5)))


# --- embedded-model attributes, mask driver, inputs -------------------------------------------------


def test_attribute_checker_needs_a_memloc_trained_model(tmp_path):
    with pytest.raises(MemlocError, match="needs a model trained by memloc train: .* has no memorization.json"):
        AttributeChecker(tmp_path)


def test_mask_driver_messages(tmp_path, monkeypatch):
    with pytest.raises(MemlocError, match="mask file .* does not exist"):
        driver_apply(tmp_path / "mask.safetensors")
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "memloc.prune", None)  # as if the driver were not installed
    with pytest.raises(MemlocError, match="--mask needs memloc.prune.*--pruned-model"):
        apply_mask_file(object(), mask)


def test_mask_driver_is_called(tmp_path, monkeypatch):
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"x")
    calls = []
    fake = type(sys)("memloc.prune")
    fake.apply_mask_file = lambda pipe, path, backend="auto": calls.append((pipe, path.name, backend))
    monkeypatch.setitem(sys.modules, "memloc.prune", fake)
    apply_mask_file("pipe", mask, backend="reference")
    assert calls == [("pipe", "mask.safetensors", "reference")]


def test_pipeline_folder_messages(tmp_path):
    cpu, f32 = CPU, torch.float32
    with pytest.raises(MemlocError, match="does not exist"):
        load_pipeline(tmp_path / "nope", device=cpu, dtype=f32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemlocError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path / "empty", device=cpu, dtype=f32)
    if not EMBEDDED_MODEL.exists():
        with pytest.raises(MemlocError, match="no --model given and the embedded model is not installed"):
            load_pipeline(None, device=cpu, dtype=f32)


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  the sea  \n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "a cat", "index": 1}) + "\n" + json.dumps({"prompt": "b"}))
    (tmp_path / "p.json").write_text(json.dumps(["x", {"text": "y"}]))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"url": "u"}))
    (tmp_path / "empty.txt").write_text("\n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "the sea"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "b"]
    assert read_prompts(tmp_path / "p.json") == ["x", "y"]
    # .csv as memloc collect reads it (a caption column), not line by line
    (tmp_path / "p.csv").write_text('caption,x\n"a cat, sitting",1\nthe sea,2\n')
    assert read_prompts(tmp_path / "p.csv") == ["a cat, sitting", "the sea"]
    with pytest.raises(MemlocError, match="entry 1"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(MemlocError, match="not UTF-8"):
        read_prompts(tmp_path / "grid.png")
    (tmp_path / "notes.md").write_text("a cat\n")
    with pytest.raises(MemlocError, match="unknown type"):
        read_prompts(tmp_path / "notes.md")
    with pytest.raises(MemlocError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(MemlocError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_image_folder_resizes_and_messages(tmp_path):
    from PIL import Image

    with pytest.raises(MemlocError, match="training image folder .* does not exist"):
        ImageFolder(tmp_path / "none", "training image folder")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(MemlocError, match="holds no images"):
        ImageFolder(tmp_path / "imgs")
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(tmp_path / "imgs" / "wide.png")
    folder = ImageFolder(tmp_path / "imgs")
    out = folder.at_size(16, 16)  # short side to 16, center crop
    assert out.shape == (1, 16, 16, 3) and np.all(out == 200)
