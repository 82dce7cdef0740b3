#!/usr/bin/env bash
# One device call: build, then a timeline probe per setting (TL_ENVS: space-separated VAR=VALUE, one
# setting each), bench_cuda_mask.py $BENCH_ARGS (default --quick) for the ONLY providers ROUNDS times,
# each round skipped when it could run past TOTAL_S, then the TESTS. BUILD=0 skips the build.
set -uo pipefail
R=/tmp/r; rm -rf "$R"; mkdir -p "$R"
trap 'tar -C "$R" -cf "$OUT/results.tar" . 2>/dev/null' EXIT
export MEMLOC_COMMIT="${MEMLOC_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$R/gpu.txt" 2>&1; cat "$R/gpu.txt"
if [ "${BUILD:-1}" = 1 ]; then  # BUILD=0: the tree is built already (run_pending.sh builds its copies at once)
  MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$R/build.log" 2>&1; echo "build rc $? after ${SECONDS} s"
fi
i=0
for setting in ${TL_ENVS:-MEMLOC_CUDA_MASK_WARM=1}; do
  i=$((i + 1)); mkdir -p "$R/tl$i"
  env "$setting" OUT="$R/tl$i" timeout 60 python benchmarks/probe_mask_timeline.py > "$R/tl$i/log" 2>&1
  echo "== $setting"; grep -E "start|span" "$R/tl$i/log" | sed -E 's/(memloc::cuda::).{0,30}//' | cut -c1-120
done
for i in $(seq 1 "${ROUNDS:-2}"); do
  [ $((SECONDS + ${BENCH_S:-200})) -gt "${TOTAL_S:-560}" ] && { echo "round $i skipped (time)"; break; }
  mkdir -p "$R/bench$i"
  OUT="$R/bench$i" timeout "${BENCH_S:-200}" python benchmarks/bench_cuda_mask.py ${BENCH_ARGS:---quick} --only "${ONLY:-cuda}" > "$R/bench$i/log" 2>&1
  echo "round $i after ${SECONDS} s"; grep -E "^  sd|MISMATCH|ERROR" "$R/bench$i/log"
done
left=$((${TOTAL_S:-560} - SECONDS))
if [ -n "${TESTS:-}" ] && [ "$left" -gt 30 ]; then
  env ${TEST_ENV:-MEMLOC_CUDA_MASK_WARM=1} MEMLOC_REQUIRE_CUDA_BACKEND=1 timeout "$left" python -m pytest -q -x -k "$TESTS" tests/test_cuda_backend.py > "$R/tests.log" 2>&1
  echo "tests rc $? (given ${left} s)"; tail -3 "$R/tests.log"
fi
