#!/usr/bin/env bash
# Train the embedded memorizing model on one GPU in one go and put everything that must come back under $OUT:
#   model.tar.00, model.tar.01, ... (the model folder, tarred and split into parts of <= 15 MB),
#   report.json (timings, steps, losses, memorization measurement), loss.png, samples.png.
# Run from the repository root with memloc (and diffusers) importable, e.g.
#   PYTHONPATH=/tmp/site:$PWD:$PWD/python bash scripts/train_embedded_gpu.sh
# Environment: OUT (default ./out/train_embedded), MAX_MINUTES (default 7), SEED (default 0);
# extra arguments go to `memloc train`, e.g. to continue the shipped model instead of starting afresh:
#   MAX_MINUTES=8 bash scripts/train_embedded_gpu.sh --resume python/memloc/assets/model
set -uo pipefail

OUT="${OUT:-$PWD/out/train_embedded}"
MAX_MINUTES="${MAX_MINUTES:-7}"
SEED="${SEED:-0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/memloc_train.XXXXXX")"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

python -m memloc train --out "$WORK/model" --report-dir "$OUT" --max-minutes "$MAX_MINUTES" --seed "$SEED" "$@"
status=$?

if [ -f "$WORK/model/model_index.json" ]; then
    python -m memloc.train.pack "$WORK/model" "$OUT" --part-mb 15 || status=3
else
    echo "train_embedded_gpu.sh: no model folder was saved" >&2
    [ "$status" -eq 0 ] && status=3
fi
ls -l "$OUT"
rm -rf "$WORK"
exit "$status"
