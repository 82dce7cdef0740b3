#!/usr/bin/env bash
# One device call for the CUDA warp kernel of memorized_mask: build the extension with CUDA, the
# bench_cuda_mask.py (Triton blocks and regs, CUDA warp and block kernels), then the Triton
# streaming-kernel tests and the CUDA backend's memorized_mask tests.
# Run from the repository root; everything goes to $OUT (default ./out/gpu_cuda_mask).
set -uo pipefail
OUT="${OUT:-$PWD/out/gpu_cuda_mask}"
mkdir -p "$OUT"
export MEMLOC_COMMIT="${MEMLOC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc $? after ${SECONDS} s" | tee -a "$OUT/build.log"
OUT="$OUT" timeout "${BENCH_S:-240}" python benchmarks/bench_cuda_mask.py ${BENCH_ARGS:-} > "$OUT/cuda_mask.log" 2>&1
echo "bench rc $? after ${SECONDS} s" >> "$OUT/cuda_mask.log"
left=$((${TOTAL_S:-570} - SECONDS))
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$left" -gt 30 ]; then
    MEMLOC_REQUIRE_CUDA_BACKEND=1 timeout "$left" python -m pytest -q -k "${TEST_K:-memorized}" \
        tests/test_cuda_backend.py > "$OUT/tests.log" 2>&1
    echo "cuda tests rc $? (given ${left} s; 124 = cut off)" >> "$OUT/tests.log"
    left=$((${TOTAL_S:-570} - SECONDS))
    [ "$left" -gt 20 ] && timeout "$left" python -m pytest -q tests/test_triton_mask_stream.py >> "$OUT/tests.log" 2>&1
    echo "triton mask-stream tests rc $? (given ${left} s; 124 = cut off)" >> "$OUT/tests.log"
fi
grep -E "MISMATCH|ERROR|^sd|^  sd" "$OUT/cuda_mask.log"
tail -3 "$OUT/tests.log" 2>/dev/null
