"""SSCD copy-detection similarity (Pizzi et al. 2022) from a model file the user supplies.

The model is the TorchScript file its authors release (e.g. ``sscd_disc_large.torchscript.pt``) or
an ONNX export (read with onnxruntime, if installed). Preprocessing follows the memorization
literature's use of SSCD (Somepalli et al.'s and Wen et al.'s code): resize the short side to 256,
center-crop 224, scale to [-1, 1]; the similarity is the cosine of the L2-normalized embeddings.
Somepalli et al. count a generation as a replica when its similarity to a training image is > 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MemlocError

REPLICA_SIMILARITY = 0.5


def _preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, 224, 224]`` in [-1, 1]."""
    from PIL import Image

    out = []
    for img in images:
        im = Image.fromarray(img)
        scale = 256 / min(im.width, im.height)
        im = im.resize((max(224, round(im.width * scale)), max(224, round(im.height * scale))), Image.BILINEAR)
        left, top = (im.width - 224) // 2, (im.height - 224) // 2
        im = im.crop((left, top, left + 224, top + 224))
        out.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return np.stack(out)


class SSCD:
    """An SSCD embedding model; :meth:`similarity` gives the cosine similarity of two image sets."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu"):
        if path is None:
            raise MemlocError(
                "SSCD similarity needs the SSCD model file (sscd_disc_large.torchscript.pt from the SSCD authors, "
                "or an ONNX export); pass it with --sscd FILE"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise MemlocError(
                f"SSCD model file {self.path} does not exist; pass the TorchScript or ONNX file with --sscd"
            )
        self.device = torch.device(device)
        if self.path.suffix.lower() == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise MemlocError(
                    f"reading the ONNX SSCD model {self.path.name} needs onnxruntime (pip install onnxruntime), "
                    "or use the TorchScript file"
                ) from None
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else None
            self._session = onnxruntime.InferenceSession(str(self.path), providers=providers)
            self._module = None
        else:
            try:
                self._module = torch.jit.load(str(self.path), map_location=self.device).eval()
            except (RuntimeError, ValueError) as exc:
                raise MemlocError(f"{self.path} is not a TorchScript SSCD model: {str(exc).splitlines()[0]}") from None
            self._session = None

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """L2-normalized float32 embeddings ``[N, D]`` (CPU) of uint8 images ``[N, H, W, 3]``."""
        feats = []
        for start in range(0, len(images), batch_size):
            x = _preprocess(images[start : start + batch_size])
            if self._session is not None:
                name = self._session.get_inputs()[0].name
                f = torch.from_numpy(np.asarray(self._session.run(None, {name: x})[0], dtype=np.float32))
            else:
                f = self._module(torch.from_numpy(x).to(self.device)).float().cpu()
            feats.append(torch.nn.functional.normalize(f, dim=1))
        return torch.cat(feats)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        """Cosine similarities ``[N, M]`` between images ``a`` and ``b`` (uint8 ``[., H, W, 3]``)."""
        return self.embed(a) @ self.embed(b).T
