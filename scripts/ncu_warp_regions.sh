#!/usr/bin/env bash
# Nsight Compute's per-instruction counters for the CUDA warp kernel of memorized_mask: the width-20
# launch (SD1.5's six 1280 x 5120 layers) of one call, single vector and batched 100 x 10
# (benchmarks/ncu_cuda_mask.py --only ...). Writes, per call, the details page and the SASS source
# page (executed instructions and stall samples per instruction, gzipped; summarize it with
# scripts/ncu_regions.py) to $OUT. Run from the repository root after the extension is built.
# KERNEL_RE: the kernel name pattern (default mask_warp; mask_bound for the bound path).
set -uo pipefail
OUT="${OUT:-$PWD/out/ncu_warp_regions}"
mkdir -p "$OUT"
for call in ${CALLS:-batched single}; do
    timeout "${NCU_CALL_S:-150}" ncu --clock-control none --profile-from-start off --kernel-name "regex:${KERNEL_RE:-mask_warp}" \
        --launch-count 1 --set full --import-source yes -f -o "$OUT/warp_$call" \
        python benchmarks/ncu_cuda_mask.py --only "$call" > "$OUT/ncu_${call}.log" 2>&1
    echo "ncu rc $? after ${SECONDS} s" >> "$OUT/ncu_${call}.log"
    [ -f "$OUT/warp_$call.ncu-rep" ] || continue
    ncu --import "$OUT/warp_$call.ncu-rep" --page details > "$OUT/details_$call.txt" 2>&1
    ncu --import "$OUT/warp_$call.ncu-rep" --page source --csv --print-source sass > "$OUT/source_$call.csv" 2>&1
    ncu --import "$OUT/warp_$call.ncu-rep" --page source --csv --print-source cuda,sass \
        > "$OUT/source_cuda_$call.csv" 2>&1
    gzip -f "$OUT/source_$call.csv" "$OUT/source_cuda_$call.csv"
    rm -f "$OUT/warp_$call.ncu-rep"
    grep -E "Duration|Achieved Occupancy|Issue Slots Busy|Executed Instructions  |Registers Per" \
        "$OUT/details_$call.txt" | head -8
done
