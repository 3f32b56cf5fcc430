"""Compile the paged prefill-attention kernels for Hopper (sm90) without a GPU: per config, the shared memory,
registers and spill stack ptxas reports, how many programs fit on one SM, whether key/value tiles come by TMA
(cp.async.bulk.tensor) or by cp.async, whether the products run as wgmma and whether ptxas serialized them
(`ser`: its info C7514, each wgmma waited for at once), whether Triton warp-specialized the
kernel (setmaxnreg, partitions), and the SASS of the first key loop: instructions per iteration by kind (nvdisasm),
and `EX2|mma`, how many of its exp2 issue while one of the program's own wgmma runs (the softmax beside a product).
Prunes benchmarks/long_prefill.py's sweep before spending GPU time (a config that spills, does not pipeline, or
fits one program per SM where another fits two will not win), and catches a kernel change that no longer compiles
for the GPU (the CPU tests run it in the interpreter only).

Variants (PrefillConfig.parse): '128,128,8,2' the pointer kernel (_prefill_kernel), '...,tma' the TMA kernel
(prefill_hopper), '...,tma,pad' with head_dim as one zero-padded box of 128, ',r128' a cap of 128 registers,
'...,gluon' the Gluon kernel (prefill_gluon; the loop reported is its steady-state one).

Usage: python benchmarks/prefill_compile.py [--kv bf16|fp8|fp32] [--new-from-cache] [--configs 128,64,8,3 ...]
       [--ws] (also compile each TMA config with its key loops marked warp_specialize, to see whether Triton acts)
Needs Triton's bundled ptxas / nvdisasm / cuobjdump (CPU installs have them). Arguments are compiled with the
divisibility by 16 that the engine's strides and pointers have at run time (Triton specializes on it).
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
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.long_prefill import SWEEP, SWEEP_TMA  # noqa: E402
from phi3v.kernels import paged_prefill, prefill_gluon, prefill_hopper  # noqa: E402
from phi3v.kernels.paged_prefill import PrefillConfig  # noqa: E402

RUNTIME_INTS = ("start", "T")  # do_not_specialize: no divisibility assumed
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SM_SMEM, SM_REGS, SM_THREADS = 227 * 1024, 65536, 2048  # per SM on sm90 (shared memory a block may use)
KINDS = ("HGMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "UTMALDG", "LDGSTS", "SYNCS", "BAR")


def _consts(cfg: PrefillConfig, act: str, fp8: bool, new_paged: bool, d: int, group: int, bs: int) -> dict:
    if cfg.variant == "gluon":
        return dict(GROUP=group, HKV=32 // group, BS=bs, D=d, D_LO=64, D_HI=32, BLOCK_M=cfg.block_m,
                    STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    common = dict(GROUP=group, BS=bs, D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE=act == "fp32", PDL=True)
    if cfg.variant == "tma":
        d_lo, d_hi = prefill_hopper.head_dim_parts(d, cfg.pad)
        return dict(common, HKV=32 // group, D_LO=d_lo, D_HI=max(d_hi, 1), HAS_HI=d_hi > 0, STAGES=cfg.num_stages)
    d_lo, d_hi = paged_prefill._split_head_dim(d)
    return dict(common, D_LO=d_lo, D_HI=max(d_hi, 1), HAS_HI=d_hi > 0, NEW_PAGED=new_paged, FP8=fp8,
                NEW_FP8=fp8 and new_paged, DYN=False)


def compile_sm90(cfg: PrefillConfig, act: str = "bf16", fp8: bool = False, new_paged: bool = False, d: int = 96,
                 group: int = 1, bs: int = 64):
    """The compiled kernel (triton.compile's result) of this config at Phi-3's shapes by default."""
    fn = {"tma": prefill_hopper._prefill_tma_kernel, "gluon": prefill_gluon._prefill_gluon_kernel}.get(
        cfg.variant, paged_prefill._prefill_kernel)
    names = fn.arg_names
    ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[act]
    consts = _consts(cfg, act, fp8, new_paged, d, group, bs)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("kc_ptr", "vc_ptr"):
            sig[n] = "*fp8e4nv" if fp8 else ptr
        elif n.endswith("_ptr"):
            sig[n] = "*i64" if n == "bt_ptr" else ptr
        else:
            sig[n] = "fp32" if n in ("qk_scale", "c") else "i32"
    div = [i for i, n in enumerate(names) if sig[n] not in ("constexpr", "fp32") and n not in RUNTIME_INTS]
    source = GluonASTSource if cfg.variant == "gluon" else ASTSource
    src = source(fn=fn, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in div})
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 64),
                          options=opts if cfg.maxnreg is None else dict(opts, maxnreg=cfg.maxnreg))


def loop_mix(sass: str) -> dict:
    """Instructions per iteration of the first loop (a backward branch) that holds wgmma (HGMMA), by kind."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", l))}
    for i, l in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", l)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.match(r"\s*/\*[0-9a-f]{4,}\*/", x)]
            if any("HGMMA" in x for x in body):
                ops = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", x).split()[0] for x in body]
                mix = {k: sum(o.startswith(k) for o in ops) for k in KINDS}
                return {"instructions": len(ops), **mix, "ex2_beside_wgmma": _ex2_in_flight(body)}
    return {"instructions": 0}


def _ex2_in_flight(body: list[str]) -> int:
    """How many MUFU.EX2 (the softmax's exp2) issue while a wgmma of this program is still running: after an
    HGMMA, before the WARPGROUP.DEPBAR that waits for all (gsb0, 0x0). 0: the softmax never overlaps a product
    within the program (only other programs on the SM can fill the tensor cores meanwhile)."""
    n, running = 0, False
    for x in body:
        if "HGMMA" in x:
            running = True
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in x:
            running = False
        elif running and "MUFU.EX2" in x:
            n += 1
    return n


def describe(k, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as p, tempfile.NamedTemporaryFile(suffix=".cubin") as o:
        p.write(k.asm["ptx"])
        p.flush()  # ptxas again, verbose: whether it serialized the wgmma (info C7514)
        ptxas = subprocess.run([os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", p.name, "-o", o.name],
                               capture_output=True, text=True)
    fields = dict(kv.split(":") for kv in next(l for l in usage.splitlines() if "REG:" in l).split())
    ptx, regs, smem = k.asm["ptx"], int(fields["REG"]), k.metadata.shared
    per_sm = min(SM_REGS // (regs * threads), SM_THREADS // threads, SM_SMEM // max(smem, 1))
    return {"shared_kb": smem / 1024, "regs": regs, "spill_bytes": int(fields["STACK"]), "per_sm": per_sm,
            "tma": ptx.count("cp.async.bulk.tensor"),
            "async_copies": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "wgmma": ptx.count("wgmma.mma_async"), "setmaxnreg": ptx.count("setmaxnreg"),
            "partitions": k.asm["ttgir"].count("ttg.warp_specialize("), "loop": loop_mix(sass),
            "wgmma_serialized": "serialized" in ptxas.stdout + ptxas.stderr}


def _with_ws(on: bool):
    """Compile the TMA kernel's key loops marked warp_specialize (tl.range's flag), to see whether Triton acts."""
    src = Path(prefill_hopper.__file__).read_text()
    if on:
        src = src.replace(", num_stages=STAGES)", ", num_stages=STAGES, warp_specialize=True)")
    ns: dict = {"__name__": "phi3v.kernels.prefill_hopper_ws"}
    path = Path(tempfile.gettempdir()) / "prefill_hopper_ws.py"  # @triton.jit reads its source from a file
    path.write_text(src)
    exec(compile(src, str(path), "exec"), ns)
    return ns["_prefill_tma_kernel"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", choices=("bf16", "fp8", "fp32"), default="bf16")
    ap.add_argument("--new-from-cache", action="store_true", help="the chunk's K/V read from the cache too")
    ap.add_argument("--configs", nargs="*", default=SWEEP + SWEEP_TMA)
    ap.add_argument("--ws", action="store_true", help="also each TMA config with warp_specialize=True loops")
    a = ap.parse_args()
    act = "fp32" if a.kv == "fp32" else "bf16"
    print(f"triton {triton.__version__}, sm90, head_dim 96, 64-token blocks, {a.kv}; loop = the first key loop's "
          "SASS per iteration (BLOCK_N keys)")
    print(f"{'config':>18} {'smem KiB':>8} {'regs':>4} {'spill':>5} {'/SM':>3} {'tma':>4} {'cp.async':>8} "
          f"{'wgmma':>5} {'ser':>3} {'ws':>3} | {'instr':>5} {'HGMMA':>5} {'EX2':>4} {'FFMA':>4} {'FMUL':>4} "
          f"{'FADD':>4} "
          f"{'FMNMX':>5} {'F2FP':>4} {'TMA':>3} {'LDGSTS':>6} {'SYNCS':>5} {'BAR':>3} {'EX2|mma':>7}")
    runs = [(t, False) for t in a.configs] + [(t, True) for t in a.configs if a.ws and ",tma" in t]
    for text, ws in runs:
        cfg = PrefillConfig.parse(text)
        try:
            if ws:
                prefill_hopper._prefill_tma_kernel, orig = _with_ws(True), prefill_hopper._prefill_tma_kernel
                try:
                    k = compile_sm90(cfg, act, a.kv == "fp8", a.new_from_cache)
                finally:
                    prefill_hopper._prefill_tma_kernel = orig
            else:
                k = compile_sm90(cfg, act, a.kv == "fp8", a.new_from_cache)
            r = describe(k, 32 * cfg.num_warps)
        except Exception as e:  # a config this Triton cannot lower
            print(f"{text + (',ws' if ws else ''):>18} failed: {str(e).strip().splitlines()[-1][:120]}")
            continue
        lp = r["loop"]
        print(f"{text + (',ws' if ws else ''):>18} {r['shared_kb']:>8.0f} {r['regs']:>4} {r['spill_bytes']:>5} "
              f"{r['per_sm']:>3} {r['tma']:>4} {r['async_copies']:>8} {r['wgmma']:>5} "
              f"{'yes' if r['wgmma_serialized'] else 'no':>3} "
              f"{'yes' if r['setmaxnreg'] or r['partitions'] else 'no':>3} | {lp['instructions']:>5} "
              + " ".join(f"{lp.get(k, 0):>{w}}" for k, w in zip(KINDS, (5, 4, 4, 4, 4, 5, 4, 3, 6, 5, 3)))
              + f" {lp.get('ex2_beside_wgmma', 0):>7}", flush=True)


if __name__ == "__main__":
    main()
