"""Where the Triton tests run: interpreted on the CPU without a GPU, compiled on CUDA with one.

Import this before anything imports triton: Triton fixes "compiled or interpreted"
(TRITON_INTERPRET) when it is imported. conftest.py sets the variable too; this module also
catches a run where triton was imported first, and skips the importing test module then.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton" in sys.modules:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: run with TRITON_INTERPRET=1",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton backend needs the triton package")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
MARKS = [
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="no CUDA device and not interpreting"),
    # the interpreter's numpy ops warn on intended int32 wrap-around (bit 31 of packed words)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
