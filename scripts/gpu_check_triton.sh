#!/usr/bin/env bash
# One device call for issue 3's open items: the Triton tests compiled on the GPU, the streaming
# mask kernel's sweep, the bare pass-1 streaming probe (bench_stream_probe.py), the apply_mask tile
# sweep with the whole op, and the side-by-side table (building the CUDA extension first, in the background).
# Run from the repository root with memloc (and diffusers, for the UNet rows) importable; about
# 9.5 minutes at most on one H200 (the tests get what is left). Everything goes to $OUT (default ./out/gpu_check_triton).
set -uo pipefail
OUT="${OUT:-$PWD/out/gpu_check_triton}"
mkdir -p "$OUT"
export MEMLOC_COMMIT="${MEMLOC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
(MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc $?" >> "$OUT/build.log") &
build=$!
# benchmarks first, the tests last with what is left of a 10-minute call (SKIP_TESTS=1: none)
OUT="$OUT" timeout 200 python benchmarks/bench_mask_stream.py > "$OUT/mask_stream.log" 2>&1
OUT="$OUT" timeout 120 python benchmarks/bench_stream_probe.py >> "$OUT/mask_stream.log" 2>&1
timeout 60 python benchmarks/bench_prune_tiles.py > "$OUT/prune_tiles.log" 2>&1
wait "$build"
OUT="$OUT" timeout 120 python benchmarks/bench_gpu_ops.py > "$OUT/bench_gpu_ops.log" 2>&1
left=$((570 - SECONDS))
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$left" -gt 30 ]; then
    timeout "$left" python -m pytest -q tests/test_triton_backend.py tests/test_triton_mask_stream.py \
        tests/test_triton_gpu.py > "$OUT/tests.log" 2>&1
    echo "tests rc $? (given ${left} s; 124 = cut off)" >> "$OUT/tests.log"
fi
tail -3 "$OUT/tests.log" 2>/dev/null; tail -1 "$OUT/build.log"
grep -E "^  sd|^  sdxl|W read at" "$OUT/mask_stream.log"
cat "$OUT/prune_tiles.log"
grep -E "^(memorized|mask_iou|apply|restore|copy)" "$OUT/bench_gpu_ops.log"
