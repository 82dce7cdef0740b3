"""Compile the streaming mask kernel (``mask_stream._blocks_mask_kernel``) for sm_90 without a GPU.

Prints its registers, stack (spills) and SASS instruction count, as a real single-vector launch on
SD1.5 shapes specializes it (16-byte aligned pointers, ALIGNED, n_vec = n_t = span = 1, chunk 256).
Uses the installed Triton's bundled ``cuobjdump`` and ``nvdisasm``; compare Triton versions by
running it from different environments (the lent H200/H100 image has Triton 3.6).

    python scripts/sass_blocks.py [--cap 128] [--maxnreg 128] [--pipe 4] [--refine] [--sass out.sass]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from memloc_kernels.triton import mask_stream  # noqa: E402

POINTERS = {"w_ptr": "*fp16", "n_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*i32", "bmx_ptr": "*fp32",
            "lst_ptr": "*i32", "stats_ptr": "*i32", "item_layer_ptr": "*i32", "item_row_ptr": "*i32",
            "item_vec_ptr": "*i32", "lay_w_ptr": "*i64", "lay_n_ptr": "*i64", "lay_z_ptr": "*i64",
            "lay_o_ptr": "*i64", "lay_dout_ptr": "*i32", "lay_din_ptr": "*i32", "lay_k_ptr": "*i32"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=128, help="gathered blocks per problem (CAPB)")
    parser.add_argument("--maxnreg", type=int, default=mask_stream.MAXNREG, help="register cap (0: none)")
    parser.add_argument("--pipe", type=int, default=4, help="pipeliner stages of pass 1")
    parser.add_argument("--refine", action="store_true", help="compile the raised-bound overflow path")
    parser.add_argument("--sass", type=Path, help="write the disassembly here")
    args = parser.parse_args()
    fn = mask_stream._blocks_mask_kernel
    names = fn.arg_names
    const = {"CH": 256, "CAPB": args.cap, "BOUND_STEPS": 10, "EVEN": True, "ALIGNED": True, "TWO_LEVEL": True,
             "PREFETCH": 0, "STAGES": 3, "PIPE": args.pipe, "FROM_PASS1": False, "pre_ptr": None,
             "lay_b_ptr": None, "lay_r_ptr": None, "REFINE": args.refine, "n_vec": 1, "n_t": 1, "vec_span": 1}
    sig = {n: POINTERS.get(n, "constexpr" if n in const else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS}
    src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    opts = {"num_warps": 1, "num_stages": 3, **({"maxnreg": args.maxnreg} if args.maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    n_instr = sum(1 for line in sass.splitlines() if line.strip().startswith("/*") and ";" in line)
    usage_line = " ".join(line.strip() for line in usage.splitlines() if "REG:" in line)
    print(f"triton {triton.__version__}  cap {args.cap}  maxnreg {args.maxnreg}  pipe {args.pipe}  "
          f"refine {int(args.refine)}: {usage_line}; {n_instr} SASS instructions")
    if args.sass:
        args.sass.write_text(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
