#!/usr/bin/env bash
# The main job on a fresh machine: make a venv, install a CPU build of torch and memloc, and run
# `memloc demo` on the embedded memorizing model (a few minutes on a CPU). Arguments go to
# `memloc demo` (e.g. --out DIR, --device cuda, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -d "$VENV" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # A CPU build: a plain `pip install torch` may fetch a multi-GB CUDA build. Use the pinned CPU
    # wheel where the machine has it, else PyTorch's CPU index, else whatever pip finds.
    python -m pip install -q "torch==2.13.0" 2>/dev/null \
        || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || python -m pip install -q torch
fi
python -m pip install -q .
memloc demo "$@"
