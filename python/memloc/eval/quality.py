"""Image quality: CLIP score (local CLIP folder), FID (local Inception weights), attribute accuracy hook.

- CLIP score: cosine similarity of the CLIP image and text embeddings of a generation and its
  prompt (raw cosine, as Wen et al. report it; torchmetrics' CLIPScore is 100 x max(cos, 0)). The
  model is a transformers CLIP folder (``save_pretrained`` layout), loaded with local_files_only.
- FID: Fréchet distance between Inception pool features (2048-d) of generations and of a
  reference image folder. Every image is resized to 299 x 299 (bicubic) first. The weights are
  either the TorchScript FID Inception (``inception-2015-12-05.pt``, the TF-FID network that
  StyleGAN/clean-fid use; called as ``model(uint8 NCHW, return_features=True)``) or torchvision's
  ``inception_v3`` ImageNet state dict (needs torchvision; features differ from TF-FID, so values
  are not comparable with published FIDs).
- Attribute accuracy: for the embedded model, whose manifest gives each generic caption's attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import MemlocError

FID_SIZE = 299


class ClipScorer:
    """CLIP score from a local transformers CLIP folder."""

    def __init__(self, folder: str | Path | None, device: str | torch.device = "cpu"):
        if folder is None:
            raise MemlocError(
                "CLIP score needs a local CLIP model folder (transformers format, e.g. openai/clip-vit-large-patch14 "
                "saved with save_pretrained); pass it with --clip-model DIR"
            )
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise MemlocError(
                f"CLIP model folder {self.folder} is missing or has no config.json; pass a transformers CLIP folder"
            )
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MemlocError(f"cannot load the CLIP model in {self.folder}: {str(exc).splitlines()[0]}") from None
        self.device = torch.device(device)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 4.x returns the projected tensor, 5.x an output whose pooler_output holds it
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Per image, the cosine similarity to its prompt; float64 ``[N]``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), batch_size):
            imgs = [img for img in images[start : start + batch_size]]
            texts = list(prompts[start : start + batch_size])
            pix = self.processor(images=imgs, return_tensors="pt")["pixel_values"].to(self.device)
            tok = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt")
            img_f = self._features(self.model.get_image_features(pixel_values=pix))
            txt_f = self._features(
                self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
                )
            )
            img_f = torch.nn.functional.normalize(img_f.float(), dim=-1)
            txt_f = torch.nn.functional.normalize(txt_f.float(), dim=-1)
            scores.append((img_f * txt_f).sum(-1).double().cpu())
        return torch.cat(scores).numpy()


class InceptionFeatures:
    """2048-d Inception pool features for FID, from a TorchScript FID Inception or torchvision weights."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu"):
        if path is None:
            raise MemlocError(
                "FID needs Inception weights: the TorchScript FID Inception (inception-2015-12-05.pt) or torchvision's "
                "inception_v3 weights file; pass it with --inception FILE"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise MemlocError(f"Inception weights file {self.path} does not exist; pass it with --inception FILE")
        self.device = torch.device(device)
        try:
            self._module = torch.jit.load(str(self.path), map_location=self.device).eval()
            self._scripted = True
            return
        except (RuntimeError, ValueError):
            pass  # not TorchScript: a state dict
        self._scripted = False
        try:
            state = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors vary by torch version
            raise MemlocError(
                f"{self.path} is neither TorchScript nor a weights file: {str(exc).splitlines()[0]}"
            ) from None
        try:
            import torchvision
        except ImportError:
            raise MemlocError(
                f"{self.path.name} is a state dict, which needs torchvision's inception_v3 (pip install torchvision); "
                "or use the TorchScript FID Inception (inception-2015-12-05.pt)"
            ) from None
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise MemlocError(
                f"{self.path.name} does not hold torchvision inception_v3 weights: {str(exc).splitlines()[0]}"
            ) from None
        net.fc = torch.nn.Identity()
        self._module = net.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """float64 features ``[N, F]`` of uint8 images ``[N, H, W, 3]``."""
        from PIL import Image

        feats = []
        for start in range(0, len(images), batch_size):
            chunk = [
                np.asarray(Image.fromarray(im).resize((FID_SIZE, FID_SIZE), Image.BICUBIC))
                for im in images[start : start + batch_size]
            ]
            x = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).contiguous().to(self.device)
            if self._scripted:
                f = self._module(x, return_features=True)
            else:
                mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
                std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)
                f = self._module((x.float() / 255 - mean) / std)
            feats.append(f.double().cpu().reshape(len(chunk), -1))
        return torch.cat(feats).numpy()


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of features ``[N, F]``; needs N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise MemlocError(f"FID needs at least 2 images per side, got {features.shape[0] if features.ndim == 2 else 0}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` for Gaussians.

    ``tr((C1 C2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``C1^(1/2) C2 C1^(1/2)``, which has the same spectrum as ``C1 C2``.
    """
    w1, v1 = np.linalg.eigh(np.atleast_2d(cov1))
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = root1 @ np.atleast_2d(cov2) @ root1
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = np.atleast_1d(mu1) - np.atleast_1d(mu2)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_root)


class AttributeChecker:
    """Procedural attribute accuracy (embedded model): does a generation show what its generic caption names?

    The captions and their attributes come from the model folder's ``memloc train`` manifest; the
    reading of attributes from pixels is ``memloc.train.attributes`` (``detect`` + ``attribute_hits``).
    """

    def __init__(self, model: str | Path | None):
        from .loading import model_folder, read_memorization

        manifest = read_memorization(model)
        if manifest is None:
            raise MemlocError(
                f"attribute accuracy needs a model trained by memloc train: {model_folder(model)} has no "
                "memorization.json"
            )
        try:
            from ..train.attributes import attribute_hits, detect
        except ImportError as exc:
            raise MemlocError(f"attribute accuracy needs memloc.train.attributes: {exc}") from None
        self._detect, self._hits = detect, attribute_hits
        self.attributes = {g["caption"]: g["attributes"] for g in manifest.generic_eval}
        if not self.attributes:
            raise MemlocError(f"the manifest of {model_folder(model)} lists no generic evaluation captions")

    @property
    def captions(self) -> list[str]:
        return list(self.attributes)

    def score(self, images: np.ndarray, prompt: str) -> float | None:
        """Fraction of ``images`` showing every attribute of ``prompt``; None for captions without attributes."""
        attrs = self.attributes.get(prompt)
        if attrs is None:
            return None
        return float(np.mean([self._hits(self._detect(im), attrs)["all"] for im in images]))
