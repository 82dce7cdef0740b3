#!/usr/bin/env bash
# Every pending measurement in one device call, from the repository root of an unpatched main:
#   CAP=585 bash benchmarks/results/pending/run_pending.sh
# CAP: seconds the command may take (set the call's timeout_s a little above it). Copies the tree
# to /tmp/<name> once per pending patch (they do not apply together), builds the copies at once,
# then runs scripts/gpu_probe.sh in each (timelines, bench_cuda_mask.py with the reference in the
# same run, GPU tests), in this order:
#   split  split_kernel.patch (single vectors: --single)
#   ring   bound_ring.patch (batched: --quick)
#   probe  the fifteenth session's smem-norms probe (only when CAP >= 480)
# Results: $OUT/<name>/results.tar and build.log; the summary is on stdout.
set -u
export PYTHONUNBUFFERED=1
CAP=${CAP:-585}
A=${OUT:?OUT must name the output folder}
ROOT=$PWD
PENDING=$ROOT/benchmarks/results/pending
PROBE_PATCH=$ROOT/benchmarks/results/h100-2026-12-07g/patches/smem_norms_probe_d6051cd.patch
FILES="csrc memloc_kernels python benchmarks/_masks.py benchmarks/_meta.py benchmarks/bench_cuda_mask.py
       benchmarks/bench_gpu_ops.py benchmarks/probe_mask_timeline.py benchmarks/conftest.py scripts setup.py
       CMakeLists.txt pyproject.toml tests README.md"
full=0; [ "$CAP" -ge 480 ] && full=1

# tree NAME PATCH: /tmp/NAME, a copy of the needed files with PATCH applied, built.
tree() {
  local dir=/tmp/$1
  mkdir -p "$A/$1" && rm -rf "$dir" && mkdir -p "$dir" || return 1
  (cd "$ROOT" && tar -c $FILES) | tar -x -C "$dir" || return 1
  (cd "$dir" && patch -p1 -s < "$2") || { echo "$1: $2 does not apply"; return 1; }
  (cd "$dir" && MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$A/$1/build.log" 2>&1)
  echo "$1: build rc $? at ${SECONDS} s"
}

# measure NAME SECONDS [VAR=VALUE ...]: scripts/gpu_probe.sh in /tmp/NAME with these settings and
# TOTAL_S=SECONDS (it skips bench rounds and cuts its tests to stay within them; its timelines take
# at most 60 s each).
measure() {
  local name=$1 budget=$2
  shift 2
  [ "$budget" -gt 60 ] || { echo "$name: skipped (${budget} s left)"; return; }
  echo "== $name (${budget} s)"
  (cd "/tmp/$name" && env OUT="$A/$name" MEMLOC_COMMIT="${MEMLOC_COMMIT:-main}+$name" TOTAL_S="$budget" BUILD=0 \
    "$@" bash scripts/gpu_probe.sh)
  echo "$name done at ${SECONDS} s"
}

nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv
tree split "$PENDING/split_kernel.patch" &
tree ring "$PENDING/bound_ring.patch" &
[ $full = 1 ] && tree probe "$PROBE_PATCH" &
wait

left() { echo $((CAP - SECONDS)); }
if [ $full = 1 ]; then
  measure split $(( $(left) * 45 / 100 )) \
    TL_ENVS="MEMLOC_CUDA_MASK_SPLIT=0 MEMLOC_CUDA_MASK_SPLIT=1 MEMLOC_CUDA_MASK_SPLIT=2 MEMLOC_CUDA_MASK_SPLIT=3" \
    ONLY=reference,cuda,cuda-split,cuda-split128,cuda-split1to2 BENCH_ARGS=--single ROUNDS=2 BENCH_S=60 \
    TESTS="split or register_budget or one_vector"
  measure ring $(( $(left) * 65 / 100 )) TL_ENVS="MEMLOC_CUDA_MASK_RING=1" \
    ONLY=reference,cuda,cuda-warp8,cuda-ring,cuda-ring4 BENCH_ARGS=--quick ROUNDS=2 BENCH_S=100 \
    TESTS="ring or bound_path"
  measure probe $(( $(left) - 5 )) TL_ENVS="MEMLOC_CUDA_MASK_ROOTS=smem" ONLY=reference,cuda,cuda-smemnorms \
    BENCH_ARGS=--single ROUNDS=1 BENCH_S=60 TEST_ENV=MEMLOC_CUDA_MASK_ROOTS=smem TESTS="one_vector"
else
  measure split $(( $(left) * 55 / 100 )) TL_ENVS="MEMLOC_CUDA_MASK_SPLIT=0 MEMLOC_CUDA_MASK_SPLIT=1" \
    ONLY=reference,cuda,cuda-split,cuda-split1to2 BENCH_ARGS=--single ROUNDS=1 BENCH_S=60 TESTS="split"
  measure ring $(( $(left) - 5 )) TL_ENVS="MEMLOC_CUDA_MASK_RING=1" ONLY=cuda,cuda-warp8,cuda-ring \
    BENCH_ARGS=--quick ROUNDS=1 BENCH_S=100 TESTS="ring"
fi
echo "all done at ${SECONDS} s"
