#!/usr/bin/env bash
# One device call for memorized_mask's CUDA kernels after the eighth session's consolidation: build
# with CUDA, the thread kernel's tests (first, under THREAD_TESTS_S), then
# bench_cuda_mask.py --quick over the providers with the reference in the same run (extend
# PROVIDERS to add one), then the CUDA backend's memorized_mask / warp tests with the time left of a
# TOTAL_S budget, then (NCU_S > 0) Nsight Compute on the warp kernel (the default;
# benchmarks/ncu_cuda_mask.py) for up to NCU_S more seconds, then a summary.
# Run from the repository root; everything goes to $OUT. About 6 minutes on an H100 (first run of a
# fresh machine; 70 s once its caches are warm).
set -uo pipefail
OUT="${OUT:-$PWD/out/gpu_mask_final}"
mkdir -p "$OUT"
export MEMLOC_COMMIT="${MEMLOC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export MEMLOC_REQUIRE_CUDA_BACKEND=1
TOTAL_S="${TOTAL_S:-560}"
PROVIDERS="${PROVIDERS:-reference,triton,cuda,cuda-thread,cuda-warp,cuda-warp-cold,cuda-warp-serial,cuda-block}"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc $? after ${SECONDS} s" | tee -a "$OUT/build.log"
timeout "${THREAD_TESTS_S:-150}" python -m pytest -q tests/test_cuda_thread.py > "$OUT/tests_thread.log" 2>&1
echo "thread tests rc $? after ${SECONDS} s (124 = cut off)" >> "$OUT/tests_thread.log"
OUT="$OUT" timeout "${BENCH_S:-200}" python benchmarks/bench_cuda_mask.py --quick --only "$PROVIDERS" \
    > "$OUT/cuda_mask.log" 2>&1
echo "bench rc $? after ${SECONDS} s" >> "$OUT/cuda_mask.log"
left=$((TOTAL_S - SECONDS))
if [ "$left" -gt 15 ]; then
    timeout "$left" python -m pytest -q tests/test_cuda_backend.py \
        -k "memorized or warp or negative_zero" > "$OUT/tests.log" 2>&1
    echo "tests rc $? after ${SECONDS} s (given ${left} s; 124 = cut off)" >> "$OUT/tests.log"
else
    echo "tests not run: ${left} s left of ${TOTAL_S}" > "$OUT/tests.log"
fi
left=$((TOTAL_S + ${NCU_S:-0} - SECONDS))
if [ "${NCU_S:-0}" -gt 0 ] && command -v ncu > /dev/null && [ "$left" -gt 60 ]; then
    timeout "$left" ncu --clock-control none --profile-from-start off --kernel-name regex:mask_warp \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats \
        python benchmarks/ncu_cuda_mask.py > "$OUT/ncu.txt" 2>&1
    echo "ncu rc $? after ${SECONDS} s" >> "$OUT/ncu.txt"
fi
grep -E "MISMATCH|ERROR|^sd|^  sd" "$OUT/cuda_mask.log"
tail -1 "$OUT/cuda_mask.log"
grep -E "passed|failed|error|FAILED" "$OUT/tests_thread.log" | tail -12
tail -1 "$OUT/tests_thread.log"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
tail -1 "$OUT/tests.log"
