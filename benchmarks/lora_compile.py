"""Compile the per-request LoRA decode kernels for Hopper (sm90) without a GPU: the expand kernel
(phi3v/kernels/lora.py) and the norm and SiLU * up kernels with and without their LoRA input (phi3v/kernels/fused.py),
at Phi-3's sizes, bf16. Per variant: registers, spill stack, global loads in the SASS (LDG) and all SASS instructions,
so a change that spills, or that changes the base kernels (LORA off), shows before GPU time is spent.

SASS is instructions per thread: the kernels have no loops, so it is what each warp issues (times warps per SM
sub-partition: the issue time of one program). Usage: python benchmarks/lora_compile.py [--rmax 16 32 64]
Needs Triton's bundled ptxas / cuobjdump / nvdisasm (CPU installs have them). Integer arguments and pointers are
compiled with the divisibility by 16 they have at run time (Triton specializes on it when launching).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v.kernels import fused, lora  # noqa: E402

H, INTER = 3072, 8192  # Phi-3-mini hidden and intermediate sizes
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTERS = {"rows_ptr": "*i64", "offs_ptr": "*i32", "w_ptr": "*bf16"}


def compile_sm90(fn, consts: dict, num_warps: int = 4) -> dict:
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = POINTERS.get(n, "*bf16")
        else:
            sig[n] = "fp32" if n == "eps" else "i32"
    div = [i for i, n in enumerate(names) if sig[n] not in ("constexpr", "fp32")]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in div})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), f.name], capture_output=True, text=True).stdout
    fields = dict(kv.split(":") for kv in next(l for l in usage.splitlines() if "REG:" in l).split())
    instr = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?[A-Z]", l)]
    return {"regs": int(fields["REG"]), "spill": int(fields["STACK"]), "ldg": sum("LDG" in l for l in instr),
            "sass": len(instr)}


def variants(rmax: int):  # (name, kernel, constexprs, num_warps) as the wrappers launch them
    pdl = {"PDL": True}
    on = {"LORA": True, "RMAX": rmax}
    off = {"LORA": False, "RMAX": 1, "RC": 1}
    bn = lora.BLOCK_N
    yield "expand (qkv)", lora._expand_kernel, dict(on, RC=lora.rank_chunk(rmax, bn), BLOCK_N=bn, **pdl), 4
    nb = triton.next_power_of_2(H)
    yield "add_rms_norm", fused._add_rms_norm_kernel, dict(off, HAS_RES=True, BLOCK=nb, **pdl), 4
    unused = "*" if rmax > lora.NORM_MAX_RMAX else ""  # the wrapper runs the expand kernel first there
    norm = dict(on, RC=lora.rank_chunk(rmax, nb), HAS_RES=True, BLOCK=nb, **pdl)
    yield "add_rms_norm +lora" + unused, fused._add_rms_norm_kernel, norm, lora.lora_warps(rmax, 8)
    yield "silu_mul", fused._silu_mul_kernel, dict(off, BLOCK=1024, **pdl), 4
    yield "silu_mul +lora", fused._silu_mul_kernel, dict(on, RC=lora.rank_chunk(rmax, 256), BLOCK=256, **pdl), \
        lora.lora_warps(rmax, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rmax", type=int, nargs="*", default=[16, 32, 64], help="the widest adapter's rank (power of 2)")
    a = ap.parse_args()
    print(f"{'kernel':>20} {'RMAX':>5} {'warps':>5} {'regs':>5} {'spill B':>7} {'LDG':>5} {'SASS':>6}")
    for rmax in a.rmax:
        for name, fn, consts, warps in variants(rmax):
            r = compile_sm90(fn, consts, warps)
            print(f"{name:>20} {rmax if consts['LORA'] else '-':>5} {warps:>5} {r['regs']:>5} {r['spill']:>7} "
                  f"{r['ldg']:>5} {r['sass']:>6}", flush=True)
    print(f"* not launched: past RMAX {lora.NORM_MAX_RMAX} the expand kernel runs before the plain norm")


if __name__ == "__main__":
    main()
