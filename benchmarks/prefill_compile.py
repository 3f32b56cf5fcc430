"""Compile the paged prefill-attention kernel for Hopper (sm90) without a GPU: per config, the shared memory,
registers and spill stack ptxas reports, and whether the key/value loads were software-pipelined (async copies)
and the products run as wgmma. Prunes benchmarks/long_prefill.py's sweep before spending GPU time (a config
that spills or does not pipeline will not win), and catches a kernel change that no longer compiles for the GPU
(the CPU tests run it in the interpreter only).

Usage: python benchmarks/prefill_compile.py [--kv bf16|fp8|fp32] [--new-from-cache] [--configs 128,64,8,3 ...]
Needs Triton's bundled ptxas / cuobjdump (CPU installs have them). Arguments are compiled with the divisibility
by 16 that the engine's strides and pointers have at run time (Triton specializes on it when launching).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.long_prefill import SWEEP  # noqa: E402
from phi3v.kernels import paged_prefill  # noqa: E402
from phi3v.kernels.paged_prefill import PrefillConfig  # noqa: E402

RUNTIME_INTS = ("start", "T")  # do_not_specialize: no divisibility assumed


def compile_sm90(cfg: PrefillConfig, act: str, fp8: bool, new_paged: bool, d: int = 96, group: int = 1, bs: int = 64):
    fn = paged_prefill._prefill_kernel
    names = fn.arg_names
    ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[act]
    d_lo, d_hi = paged_prefill._split_head_dim(d)
    consts = dict(GROUP=group, BS=bs, D=d, D_LO=d_lo, D_HI=max(d_hi, 1), HAS_HI=d_hi > 0, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, NEW_PAGED=new_paged, FP8=fp8, NEW_FP8=fp8 and new_paged, IEEE=act == "fp32",
                  PDL=True)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("kc_ptr", "vc_ptr"):
            sig[n] = "*fp8e4nv" if fp8 else ptr
        elif n.endswith("_ptr"):
            sig[n] = "*i64" if n == "bt_ptr" else ptr
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
    div = [i for i, n in enumerate(names) if sig[n] not in ("constexpr", "fp32") and n not in RUNTIME_INTS]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in div})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(kv.split(":") for kv in next(l for l in usage.splitlines() if "REG:" in l).split())
    ptx = k.asm["ptx"]
    return {"shared_kb": k.metadata.shared / 1024, "regs": int(fields["REG"]), "spill_bytes": int(fields["STACK"]),
            "async_copies": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "wgmma": ptx.count("wgmma.mma_async")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", choices=("bf16", "fp8", "fp32"), default="bf16")
    ap.add_argument("--new-from-cache", action="store_true", help="the chunk's K/V read from the cache too")
    ap.add_argument("--configs", nargs="*", default=SWEEP + ["16,16,4,2"])
    a = ap.parse_args()
    act = "fp32" if a.kv == "fp32" else "bf16"
    print(f"{'config':>14} {'smem KiB':>8} {'regs':>5} {'spill B':>7} {'async cp':>8} {'wgmma':>6}")
    for text in a.configs:
        try:
            r = compile_sm90(PrefillConfig.parse(text), act, a.kv == "fp8", a.new_from_cache)
        except Exception as e:  # a config this Triton cannot lower
            print(f"{text:>14} failed: {str(e)[:120]}")
            continue
        print(f"{text:>14} {r['shared_kb']:>8.0f} {r['regs']:>5} {r['spill_bytes']:>7} {r['async_copies']:>8} "
              f"{r['wgmma']:>6}", flush=True)


if __name__ == "__main__":
    main()
