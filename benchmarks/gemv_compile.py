"""Compile the quantized decode GEMVs for Hopper (sm90) without a GPU and read their main K loop from the SASS:
per config the registers and spill stack ptxas reports, whether the product runs as wgmma (xGMMA in the SASS)
or mma.sync (HMMA), how many weight bytes each SM keeps in flight, and the instructions of one K-loop iteration
per weight byte it streams.

Two static limits of a bandwidth-bound GEMV, comparable between kernels (the GPU run decides):
- issue: an SM issues at most 4 warp-instructions a cycle, so a loop of I warp-instructions per warp, W warps and
  B weight bytes per iteration streams at most 4 * clock * SMs * B / (I * W) bytes/s (`issue TB/s`; H200: 132
  SMs at 1.98 GHz; it ignores slower pipes such as conversions);
- bytes in flight: HBM's latency (~1 us loaded) times its bandwidth (4.8 TB/s) is ~36 KiB per SM that must be in
  flight. `CTA/SM` = resident programs per SM (registers, shared memory, warps; a grid smaller than that many per
  SM holds fewer), `KiB fly` = their weight bytes in flight: (num_stages - 1) tiles each when the loop's loads
  are asynchronous copies (LDGSTS), else the one tile loaded into registers.
Configs that spill, miss wgmma or fit no CTA are pruned from benchmarks/quant_sweep.py's sweep (SWAP_FP8 /
DOT_INT4 there are the survivors of this script's candidate grid).

Usage: python benchmarks/gemv_compile.py [--rows 1] [--only fp8_fma,fp8_a8,fp8_a16,int4_fma,int4_dot]
                                         [--sweep-lists] [--sass DIR]
  (K = 3072; the loop does not depend on N or K.) Needs Triton's bundled ptxas / cuobjdump / nvdisasm (CPU
installs have them). The Triton compiling here may differ from the GPU machine's (`python -c 'import triton;
print(triton.__version__)'` on both): device_call.sh's `gemv_compile` step runs this there.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU machine's default (silences a warning)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quant_sweep  # noqa: E402
from benchmarks.quant_sweep import fma_fp8_configs, fma_int4_configs  # noqa: E402
from phi3v.kernels import gemv, gemv_dot, int4  # noqa: E402
from phi3v.kernels.gemv import GemvConfig  # noqa: E402
from phi3v.kernels.int4 import Int4GemvConfig  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ISSUE_PER_S = 4 * 1.98e9 * 132  # H200: warp-instructions issued per second, all SMs
G = 128

# the tensor-core GEMVs' candidates (quant_sweep.SWAP_FP8 / DOT_INT4 hold the survivors)
CAND_FP8 = [GemvConfig(bn, bk, 1, nw, st, swap_ab=ab) for ab, bn, bk, nw, st in
            itertools.product(("a8", "a16"), (64, 128), (128, 256, 512), (4, 8), (2, 3, 4))]
CAND_INT4 = [Int4GemvConfig(bn, G, nw, dot=True, num_stages=st, asm=asm) for asm, bn, nw, st in
             itertools.product((False, True), (64, 128, 256), (4, 8), (1, 2, 3, 4))]


@dataclass
class Job:
    kind: str  # fp8_fma | fp8_a8 | fp8_a16 | int4_fma | int4_dot
    config: object
    fn: object
    ptrs: dict  # pointer argument -> Triton type (other pointers bf16, other arguments i32)
    consts: dict
    num_warps: int
    num_stages: int
    weight_bytes: int  # streamed per K tile (one loop iteration)
    shared: int = 0  # bytes of shared memory per CTA, once compiled


def _sig(fn, consts: dict, ptrs: dict, runtime: tuple[str, ...] = ("M",)) -> tuple[dict, dict]:
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*bf16" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    div = [i for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr" and n not in runtime]
    return sig, {(i,): [["tt.divisibility", 16]] for i in div}


def jobs(kinds: set[str], rows: int, swap_fp8: list[GemvConfig], dot_int4: list[Int4GemvConfig]) -> list[Job]:
    out = []
    m_pad = 1 << max(rows - 1, 0).bit_length()
    fp8_ptrs = {"w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "ws_ptr": "*fp32"}
    i4_ptrs = {"qw_ptr": "*u8", "s_ptr": "*fp16", "m_ptr": "*fp16"}
    if "fp8_fma" in kinds:
        for c in fma_fp8_configs(3072):
            consts = dict(M_PAD=16 if c.dot else m_pad, BLOCK_N=c.block_n, BLOCK_K=c.block_k, USE_DOT=c.dot,
                          IEEE=False, HAS_SCALE=True, PDL=True)
            out.append(Job("fp8_fma", c, gemv._gemv_kernel, fp8_ptrs, consts, c.num_warps, c.num_stages,
                           c.block_n * c.block_k))
    for c in swap_fp8:
        if f"fp8_{c.swap_ab}" in kinds:
            consts = dict(BLOCK_N=c.block_n, BLOCK_K=c.block_k, A8=c.swap_ab == "a8", IEEE=False, M_PAD=m_pad,
                          AMAX_BLOCK=min(gemv_dot.AMAX_ELEMS // m_pad, 4096), PDL=True)
            out.append(Job(f"fp8_{c.swap_ab}", c, gemv_dot._fp8_dot_kernel, fp8_ptrs, consts, c.num_warps,
                           c.num_stages, c.block_n * c.block_k))
    if "int4_fma" in kinds:
        for c in fma_int4_configs():
            bk = c.block_k or 1024
            consts = dict(M_PAD=m_pad, BLOCK_N=c.block_n, BLOCK_K=bk, G=G, EARLY=True, PDL=True)
            out.append(Job("int4_fma", c, int4._int4_gemv_kernel, i4_ptrs, consts, c.num_warps, 1,
                           c.block_n * (bk // 2 + 4 * bk // G)))
    if "int4_dot" in kinds:
        for c in dot_int4:
            consts = dict(BLOCK_N=c.block_n, G=G, IEEE=False, PDL=True, ASM=c.asm)  # one group per step
            out.append(Job("int4_dot", c, int4._int4_dot_kernel, i4_ptrs, consts, c.num_warps, c.num_stages,
                           c.block_n * (G // 2 + 4)))
    return out


def compile_job(j: Job) -> tuple[bytes, str]:
    sig, attrs = _sig(j.fn, j.consts, j.ptrs)
    k = triton.compile(ASTSource(fn=j.fn, signature=sig, constexprs=j.consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": j.num_warps, "num_stages": j.num_stages})
    j.shared = k.metadata.shared
    return k.asm["cubin"], k.asm["ptx"]


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True, check=True).stdout


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def loops(sass: str) -> list[list[str]]:
    """Each backward branch's body: the opcodes (with modifiers) from its target to the branch."""
    instrs: list[tuple[int, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        if (m := LABEL.match(line)):
            pending.append(m.group(1))
        elif (m := INSTR.search(line)):
            for lab in pending:
                labels[lab] = len(instrs)
            pending = []
            instrs.append((int(m.group(1), 16), m.group(3), m.group(4)))
    out = []
    for i, (_, op, rest) in enumerate(instrs):
        if op.startswith("BRA") and (t := re.search(r"\((\.L_x_\d+)\)", rest)) and labels.get(t.group(1), i + 1) <= i:
            out.append([o for _, o, _ in instrs[labels[t.group(1)]: i + 1]])
    return out


def main_loop(body_list: list[list[str]]) -> list[str]:
    """The K loop: the loop with tensor-core instructions, else the one with the most fp32 FMAs."""
    def key(b: list[str]) -> tuple[int, int]:
        return sum("MMA" in o for o in b), sum(o.startswith(("FFMA", "HFMA2")) for o in b)
    return max(body_list, key=key) if body_list else []


def classes(body: list[str]) -> dict[str, int]:
    groups = {"mma": ("HGMMA", "QGMMA", "HMMA", "WARPGROUP"), "cvt": ("F2F", "F2FP", "I2F", "F2I"),
              "fma": ("FFMA", "HFMA2", "FMUL", "FADD", "HADD2", "HMUL2"), "ld": ("LDG", "LDGSTS", "LDS", "LDSM", "STS"),
              "int": ("LOP3", "SHF", "IADD3", "IMAD", "LEA", "ISETP", "SEL", "MOV", "PRMT")}
    out = {k: sum(o.startswith(p) for o in body) for k, p in groups.items()}
    out["other"] = len(body) - sum(out.values())
    return out


def analyse(j: Job, sass_dir: str | None) -> dict:
    cubin, ptx = compile_job(j)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _tool("cuobjdump", "-res-usage", f.name)
        sass = _tool("nvdisasm", "-c", f.name)
    fields = dict(kv.split(":") for kv in next(l for l in usage.splitlines() if "REG:" in l).split())
    if sass_dir:
        Path(sass_dir, f"{j.kind}_{_cfg_text(j)}.sass").write_text(sass)
    body = main_loop(loops(sass))
    per_byte = len(body) * j.num_warps / j.weight_bytes  # warp-instructions per weight byte
    regs, smem = int(fields["REG"]), j.shared
    # resident CTAs per SM (sm90: 64 warps, 64k registers allocated per warp in 256s, 228 KiB shared memory with
    # 1 KiB reserved per CTA) and the weight bytes each has in flight: (stages - 1) tiles when the loop's loads are
    # asynchronous copies (LDGSTS), else the one tile loaded into registers
    per_warp = -(-regs * 32 // 256) * 256
    ctas = min(64 // j.num_warps, 65536 // (per_warp * j.num_warps), (228 << 10) // (smem + 1024), 32)
    tiles = max(j.num_stages - 1, 1) if any(o.startswith("LDGSTS") for o in body) else 1
    return {"regs": regs, "spill": int(fields["STACK"]) + int(fields.get("LOCAL", 0)), "ctas_per_sm": ctas,
            "in_flight_kib": ctas * tiles * j.weight_bytes / 1024,
            "wgmma": sum(o.startswith(("HGMMA", "QGMMA")) for o in sass.split()),
            "mma_sync": sum(o.startswith("HMMA") for o in sass.split()), "async": "cp.async" in ptx,
            "loop_instrs": len(body), "instr_per_byte": per_byte,
            "issue_tb_s": ISSUE_PER_S / per_byte / 1e12 if per_byte else float("nan"), "classes": classes(body)}


def _cfg_text(j: Job) -> str:
    c = j.config
    if isinstance(c, GemvConfig):
        kind = c.swap_ab or ("dot" if c.dot else "")
        return f"{c.block_n}x{c.block_k}s{c.split_k}w{c.num_warps}st{c.num_stages}{kind}"
    assert isinstance(c, Int4GemvConfig)
    kind = ("asm" if c.asm else "dot") if c.dot else ""
    return f"{c.block_n}x{c.block_k or (G if c.dot else 1024)}w{c.num_warps}st{c.num_stages}{kind}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1, help="x rows (the CUDA-core kernels' loops depend on it)")
    ap.add_argument("--only", default="fp8_fma,fp8_a8,fp8_a16,int4_fma,int4_dot")
    ap.add_argument("--sass", help="write each config's SASS to this folder")
    ap.add_argument("--sweep-lists", action="store_true",
                    help="the tensor-core configs of quant_sweep.py (default: the wider candidate grid here)")
    a = ap.parse_args()
    if a.sass:
        os.makedirs(a.sass, exist_ok=True)
    print(f"rows {a.rows}, sm90, Triton {triton.__version__}; loop classes: mma cvt fma ld int other")
    print(f"{'kernel':>9} {'config':>22} {'regs':>4} {'spill':>5} {'wgmma':>5} {'mma.sync':>8} {'CTA/SM':>6} "
          f"{'KiB fly':>7} {'B/iter':>6} {'instr/iter':>10} {'instr/B':>7} {'issue TB/s':>10}  classes")
    fp8, i4 = (quant_sweep.SWAP_FP8, quant_sweep.DOT_INT4) if a.sweep_lists else (CAND_FP8, CAND_INT4)
    for j in jobs(set(a.only.split(",")), a.rows, fp8, i4):
        try:
            r = analyse(j, a.sass)
        except Exception as e:  # noqa: BLE001 - a config this Triton cannot lower
            print(f"{j.kind:>9} {_cfg_text(j):>22} failed: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        c = r["classes"]
        print(f"{j.kind:>9} {_cfg_text(j):>22} {r['regs']:>4} {r['spill']:>5} {r['wgmma']:>5} {r['mma_sync']:>8} "
              f"{r['ctas_per_sm']:>6} {r['in_flight_kib']:>7.0f} {j.weight_bytes:>6} {r['loop_instrs']:>10} "
              f"{r['instr_per_byte']:>7.3f} {r['issue_tb_s']:>10.1f}  "
              f"{c['mma']} {c['cvt']} {c['fma']} {c['ld']} {c['int']} {c['other']}", flush=True)


if __name__ == "__main__":
    main()
