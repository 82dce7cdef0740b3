#!/usr/bin/env bash
# Profile the default memorized_mask Triton kernel on SD1.5 shapes with Nsight Compute (needs a
# runtime where ncu reads counters, device KINDS.md). Writes the details page and the per-SASS
# source page (stall samples per instruction) to $OUT.
set -uo pipefail
OUT="${OUT:-$PWD/out/ncu_mask}"
mkdir -p "$OUT"
timeout 200 ncu --clock-control none --kernel-name regex:mask_kernel --launch-skip 2 --launch-count 1 \
    --set full --import-source no -f -o "$OUT/mask" python scripts/ncu_mask.py > "$OUT/ncu_run.log" 2>&1
echo "ncu rc $?" >> "$OUT/ncu_run.log"
ncu --import "$OUT/mask.ncu-rep" --page details > "$OUT/details.txt" 2>&1
ncu --import "$OUT/mask.ncu-rep" --page source --csv --print-source sass > "$OUT/source.csv" 2>&1
gzip -f "$OUT/source.csv"
rm -f "$OUT/mask.ncu-rep"
tail -2 "$OUT/ncu_run.log"
grep -E "Duration|Achieved Occupancy|Issue Slots Busy|Warp Cycles Per Issued|Registers Per|Memory Throughput|No Eligible" "$OUT/details.txt" | head -20
