#!/usr/bin/env bash
# One device call for an A/B of the CUDA memorized_mask kernels: builds this tree and a base tree
# (base.tar, from `git archive <base> csrc memloc_kernels python benchmarks/... tests setup.py ...`)
# side by side, runs TESTS_FIRST (pytest -k) on this tree, times bench_cuda_mask.py --quick for
# the base (BASE_ONLY providers) and this tree (NEW_ONLY) alternately ROUNDS times, then runs
# TESTS_LATER with the time left. Everything goes to $OUT as results.tar (one file comes back).
set -uo pipefail
OUT="${OUT:-$PWD/out/gpu_ab}"
R=/tmp/r; rm -rf "$R"; mkdir -p "$R" /tmp/base
trap 'tar -C "$R" -cf "$OUT/results.tar" . 2>/dev/null' EXIT
export MEMLOC_COMMIT="${MEMLOC_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$R/gpu.txt" 2>&1
tar -xf base.tar -C /tmp/base
(cd /tmp/base && MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$R/build_base.log" 2>&1; echo "rc $?" >> "$R/build_base.log") &
MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$R/build_new.log" 2>&1; echo "rc $?" >> "$R/build_new.log"
wait
echo "builds done after ${SECONDS} s"; tail -1 "$R/build_base.log" "$R/build_new.log"
if [ -n "${TESTS_FIRST:-}" ]; then
  MEMLOC_REQUIRE_CUDA_BACKEND=1 timeout "${TESTS_FIRST_S:-150}" python -m pytest -q -x -k "$TESTS_FIRST" tests/test_cuda_backend.py > "$R/tests_first.log" 2>&1
  echo "tests_first rc $? after ${SECONDS} s" | tee -a "$R/tests_first.log"; tail -5 "$R/tests_first.log"
fi
for i in $(seq 1 "${ROUNDS:-2}"); do
  mkdir -p "$R/base$i" "$R/new$i"
  (cd /tmp/base && OUT="$R/base$i" MEMLOC_COMMIT="${BASE_COMMIT:-base}" timeout 120 python benchmarks/bench_cuda_mask.py --quick --only "${BASE_ONLY:-cuda}" > "$R/base$i/log" 2>&1)
  OUT="$R/new$i" timeout 150 python benchmarks/bench_cuda_mask.py --quick --only "${NEW_ONLY:-cuda}" > "$R/new$i/log" 2>&1
  echo "round $i after ${SECONDS} s"
  grep -E "^  sd|MISMATCH|ERROR" "$R/base$i/log" "$R/new$i/log"
done
left=$((${TOTAL_S:-560} - SECONDS))
if [ -n "${TESTS_LATER:-}" ] && [ "$left" -gt 30 ]; then
  MEMLOC_REQUIRE_CUDA_BACKEND=1 timeout "$left" python -m pytest -q -k "$TESTS_LATER" tests/test_cuda_backend.py > "$R/tests_later.log" 2>&1
  echo "tests_later rc $? (given ${left} s; 124 = cut off)" | tee -a "$R/tests_later.log"; tail -4 "$R/tests_later.log"
fi
