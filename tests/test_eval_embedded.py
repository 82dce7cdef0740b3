"""On the embedded memorizing model: Wen et al.'s detection metric separates memorized from generic captions."""

import numpy as np
import pytest
import torch

from memloc.eval.detection import detection_metric
from memloc.eval.loading import EMBEDDED_MODEL, load_pipeline, read_memorization

pytestmark = [
    pytest.mark.skipif(
        not (EMBEDDED_MODEL / "model_index.json").is_file(),
        reason=f"the embedded model is not installed ({EMBEDDED_MODEL} has no model_index.json)",
    ),
    pytest.mark.usefixtures("one_thread"),
]


def test_detection_metric_is_higher_for_memorized_captions():
    manifest = read_memorization(None)
    if manifest is None or not manifest.captions or not manifest.generic_eval:
        pytest.skip(f"{EMBEDDED_MODEL} has no memorization.json with memorized and generic captions")
    memorized = manifest.captions[:8]
    generic = [g["caption"] for g in manifest.generic_eval][:8]
    pipe = load_pipeline(None, device=torch.device("cpu"), dtype=torch.float32)
    # Wen et al.: the first steps already separate memorized prompts
    kwargs = dict(samples=2, steps=50, max_steps=3, guidance=7.5, batch_size=32)
    mem = detection_metric(pipe, memorized, **kwargs)
    gen = detection_metric(pipe, generic, **kwargs)
    assert mem.mean() > gen.mean() and np.median(mem) > np.median(gen), f"memorized {mem}, generic {gen}"
