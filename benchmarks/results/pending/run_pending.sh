#!/usr/bin/env bash
# Every pending measurement in one device call, from the repository root of an unpatched main:
#   CAP=585 bash benchmarks/results/pending/run_pending.sh
# CAP: seconds the command may take (set the call's timeout_s a little above it). Copies the tree
# to /tmp/split (split_kernel.patch applied) and, when CAP >= 480, to /tmp/probe (the fifteenth
# session's smem-norms probe applied; the two patches do not apply together), builds both at once,
# then runs scripts/gpu_probe.sh in each: timelines, bench_cuda_mask.py (reference in the same run),
# GPU tests. Below CAP 480 only the split kernel is measured, on single vectors only (--single).
# Results: $OUT/split/results.tar, $OUT/probe/results.tar; the summary is on stdout.
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
mkdir -p "$A/split" "$A/probe"

# tree DIR PATCH: a copy of the needed files with PATCH applied, then built (log in $A/<name>/build.log).
tree() {
  rm -rf "$1" && mkdir -p "$1" || return 1
  (cd "$ROOT" && tar -c $FILES) | tar -x -C "$1" || return 1
  (cd "$1" && patch -p1 -s < "$2") || { echo "$2 does not apply"; return 1; }
  (cd "$1" && MEMLOC_CUDA=1 python setup.py build_ext --inplace > "$A/$(basename "$1")/build.log" 2>&1)
  echo "$(basename "$1"): build rc $? at ${SECONDS} s"
}

nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv
tree /tmp/split "$PENDING/split_kernel.patch" &
[ $full = 1 ] && tree /tmp/probe "$PROBE_PATCH" &
wait

if [ $full = 1 ]; then
  tls="MEMLOC_CUDA_MASK_SPLIT=0 MEMLOC_CUDA_MASK_SPLIT=1 MEMLOC_CUDA_MASK_SPLIT=2 MEMLOC_CUDA_MASK_SPLIT=3"
  only=reference,cuda,cuda-split,cuda-split128,cuda-split1to2; args=--quick; bench_s=110; reserve=115
else
  tls="MEMLOC_CUDA_MASK_SPLIT=0 MEMLOC_CUDA_MASK_SPLIT=1"
  only=reference,cuda,cuda-split,cuda-split1to2; args=--single; bench_s=70; reserve=10
fi
(cd /tmp/split && OUT=$A/split MEMLOC_COMMIT="${MEMLOC_COMMIT:-main}+split" TL_ENVS="$tls" ONLY=$only \
  BENCH_ARGS=$args ROUNDS=2 BENCH_S=$bench_s TOTAL_S=$((CAP - reserve - SECONDS)) \
  TESTS="split or register_budget or one_vector" bash scripts/gpu_probe.sh)
echo "split done at ${SECONDS} s"

left=$((CAP - SECONDS))
if [ $full = 1 ] && [ $left -gt 90 ]; then
  (cd /tmp/probe && OUT=$A/probe MEMLOC_COMMIT="${MEMLOC_COMMIT:-main}+smemnorms" TL_ENVS="MEMLOC_CUDA_MASK_ROOTS=smem" \
    ONLY=reference,cuda,cuda-smemnorms ROUNDS=1 BENCH_S=$((left - 20)) TOTAL_S=$((left - 5)) \
    TEST_ENV=MEMLOC_CUDA_MASK_ROOTS=smem TESTS="one_vector" timeout $left bash scripts/gpu_probe.sh)
fi
echo "all done at ${SECONDS} s"
