"""Tuning sweep of the quantized-weight kernels at Phi-3-vision's shapes (GPU): the FP8 GEMV and the int4 GEMV at
1 and 4 rows (weight GB/s, cycling over weight copies past L2), the int4 GEMM at 2,560 rows (TFLOP/s) beside
cuBLAS bf16 and torch._scaled_mm FP8 on the same shape. Prints the best config per shape and how far the default
is from it, and the best of each kernel (`best_by_kernel`: fma = CUDA cores, dot = mma.sync with x as the M side
(fp8) or the int4 swap-AB tensor-core GEMV, a8 / a16 = the fp8 swap-AB ones of phi3v.kernels.gemv_dot); JSON to --out.

Each config is timed as CUDA-graph replays (a decode step's kernels are replayed from graphs).
Usage: python benchmarks/quant_sweep.py [--rows 1,4] [--gemm] [--only-dot] [--out $OUT/quant_sweep.json]
Smoke run on the CPU: TRITON_INTERPRET=1 python benchmarks/quant_sweep.py --smoke (tiny shapes, a few configs)
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quant_check import time_cycle  # noqa: E402
from phi3v.bench import emit, graph_ms  # noqa: E402
from phi3v.kernels import fp8_act, gemv, int4  # noqa: E402
from phi3v.kernels.gemv import GemvConfig  # noqa: E402
from phi3v.kernels.int4 import Int4GemmConfig, Int4GemvConfig  # noqa: E402
from phi3v.models.quant import (dequantize_int4, fp8_linear_reference, quantize_fp8,  # noqa: E402
                                quantize_int4)

SHAPES = {"qkv": (9216, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192),
          "lm_head": (32064, 3072)}
PAST_L2 = 256 << 20
DEV = "cuda"
CHECK_TOL = 1e-2  # a config's output against the torch math of the same quantized weights (bf16 output: ~2e-3)
# The tensor-core (swap-AB) GEMVs' configs worth timing: the survivors of benchmarks/gemv_compile.py (no spills,
# wgmma, few instructions per weight byte, >= ~50 KiB of weights in flight per SM; docs/perf-log.md). Each is also
# timed with K split 2 and 4 ways where N gives too few row blocks for 132 SMs (with_splits).
SWAP_FP8: list[GemvConfig] = [
    GemvConfig(128, 128, 1, 4, 3, swap_ab="a8"), GemvConfig(128, 256, 1, 4, 2, swap_ab="a8"),
    GemvConfig(64, 256, 1, 4, 3, swap_ab="a8"), GemvConfig(128, 128, 1, 8, 2, swap_ab="a8"),
    GemvConfig(64, 128, 1, 4, 3, swap_ab="a8"), GemvConfig(128, 256, 1, 8, 2, swap_ab="a8"),
    GemvConfig(64, 128, 1, 4, 4, swap_ab="a16"), GemvConfig(128, 128, 1, 8, 2, swap_ab="a16")]
DOT_INT4: list[Int4GemvConfig] = [
    Int4GemvConfig(128, 0, 4, dot=True, num_stages=4, asm=True),
    Int4GemvConfig(64, 0, 4, dot=True, num_stages=4, asm=True),
    Int4GemvConfig(256, 0, 8, dot=True, num_stages=4, asm=True),
    Int4GemvConfig(128, 0, 8, dot=True, num_stages=4, asm=True),
    Int4GemvConfig(128, 0, 4, dot=True, num_stages=4), Int4GemvConfig(64, 0, 4, dot=True, num_stages=4)]


def fma_fp8_configs(k: int) -> list[GemvConfig]:
    """The CUDA-core FP8 GEMV's grid (and the mma.sync `dot` one)."""
    cfgs = [GemvConfig(bn, bk, sk, nw, 1, False)
            for bn, bk, sk, nw in itertools.product((4, 8, 16), (512, 1024, 2048), (1, 2), (4, 8)) if bk <= k]
    return cfgs + [GemvConfig(bn, 128, sk, 4, 3, True) for bn, sk in itertools.product((32, 64), (1, 4))]


def fma_int4_configs() -> list[Int4GemvConfig]:
    return [Int4GemvConfig(bn, bk, nw) for bn, bk, nw in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))]


def with_splits(cfgs: list, n: int) -> list:
    """cfgs, plus each with K split 2 and 4 ways when N gives fewer than 2 row blocks per SM (132 SMs; a 64-row
    block of qkv's 9,216 rows makes 144 programs: 12 SMs would run two)."""
    return cfgs + [replace(c, split_k=s) for s in (2, 4) for c in cfgs if -(-n // c.block_n) < 264]


def _copies(tensors: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    if DEV != "cuda":
        return [tensors]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(min(63, PAST_L2 // nbytes))]


def _best(fn, configs: list, default, check=None) -> dict:
    """fn(config) -> seconds; the best config and the default's time. check(config) -> relative error of its
    output against the torch math: a config over CHECK_TOL is reported in `wrong` and not timed."""
    times, wrong = {}, {}
    for c in configs + [default]:
        try:
            err = check(c) if check is not None else 0.0
            if err > CHECK_TOL:
                wrong[repr(c)] = err
                print(f"  WRONG {c}: relative error {err:.3g}")
                continue
            times[c] = fn(c)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is skipped
            print(f"  skipped {c}: {type(e).__name__}")
    best = min(times, key=times.get)
    kinds: dict[str, tuple] = {}  # the best of each kernel, so that a loser's best tile is known too
    for c, t in times.items():
        kind = getattr(c, "swap_ab", "") or ("dot" if getattr(c, "dot", False) else "fma")
        if kind not in kinds or t < kinds[kind][1]:
            kinds[kind] = (c, t)
    return {"best": repr(best), "best_us": times[best] * 1e6, "default_us": times.get(default, float("nan")) * 1e6,
            "best_by_kernel": {k: {"config": repr(c), "us": t * 1e6} for k, (c, t) in kinds.items()}, "wrong": wrong}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def graph_cycle(fns: list, reps: int = 10) -> float:
    """Seconds per call of the callables `fns` called in turn, replayed as one CUDA graph (phi3v.bench.graph_ms);
    the host clock on the CPU (smoke runs)."""
    if DEV != "cuda":
        return time_cycle(fns, reps=1)
    return graph_ms(lambda: [f() for f in fns], reps) / 1000 / len(fns)


def sweep_gemv(n: int, k: int, rows: int, dev: str, smoke: bool = False, only_dot: bool = False) -> dict:
    w = torch.randn(n, k, device=dev) * 0.02
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    out = {}
    fp8 = _copies(quantize_fp8(w))
    fp8_bytes = n * k + 4 * n
    cfgs = [] if only_dot else fma_fp8_configs(k)
    cfgs = cfgs[::12] if smoke else cfgs
    swap = with_splits([c for c in SWAP_FP8 if c.block_k <= k], n)
    cfgs += swap[:2] if smoke else swap
    q0, s0 = fp8[0]
    refs = {a8: fp8_linear_reference(x, q0, s0, per_token=a8) for a8 in (False, True)}  # W8A8 for swap_ab "a8"
    r = _best(lambda c: graph_cycle([lambda q=q, s=s: gemv.linear(x, q, c, scale=s) for q, s in fp8]), cfgs,
              gemv.default_config(rows, n, k, fp8=True),
              lambda c: _rel(gemv.linear(x, q0, c, scale=s0), refs[c.swap_ab == "a8"]))
    r["best_gb_s"] = fp8_bytes / r["best_us"] / 1e3
    r["default_gb_s"] = fp8_bytes / r["default_us"] / 1e3
    for v in r["best_by_kernel"].values():
        v["gb_s"] = fp8_bytes / v["us"] / 1e3
    out["fp8_gemv"] = r
    i4 = _copies(quantize_int4(w, 128))
    i4_bytes = n * k // 2 + 4 * n * k // 128
    cfgs = [] if only_dot else fma_int4_configs()
    cfgs = cfgs[::16] if smoke else cfgs
    dot = with_splits(DOT_INT4, n)
    cfgs += dot[:2] if smoke else dot
    ref = x.float() @ dequantize_int4(*i4[0]).T
    r = _best(lambda c: graph_cycle([lambda t=t: int4.linear(x, *t, gemv_config=c) for t in i4]), cfgs,
              Int4GemvConfig(), lambda c: _rel(int4.linear(x, *i4[0], gemv_config=c), ref))
    r["best_gb_s"] = i4_bytes / r["best_us"] / 1e3
    r["default_gb_s"] = i4_bytes / r["default_us"] / 1e3
    for v in r["best_by_kernel"].values():
        v["gb_s"] = i4_bytes / v["us"] / 1e3
    out["int4_gemv"] = r
    wb = _copies((w.to(torch.bfloat16),))
    out["bf16_gemv_gb_s"] = 2 * n * k / graph_cycle([lambda t=t: gemv.linear(x, t[0]) for t in wb]) / 1e9
    out["bf16_cublas_gb_s"] = 2 * n * k / graph_cycle([lambda t=t: F.linear(x, t[0]) for t in wb]) / 1e9
    return out


def sweep_gemm(n: int, k: int, rows: int, dev: str, smoke: bool = False) -> dict:
    w = torch.randn(n, k, device=dev) * 0.02
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    flop = 2 * rows * n * k
    q = quantize_int4(w, 128)
    cfgs = [Int4GemmConfig(bm, bn, nw, st) for bm, bn, nw, st in itertools.product((64, 128), (64, 128, 256), (4, 8),
                                                                                   (2, 3, 4))]
    cfgs = [Int4GemmConfig(16, 16, 2, 1)] if smoke else cfgs
    r = _best(lambda c: time_cycle([lambda: int4.linear(x, *q, gemm_config=c)]), cfgs, int4.default_gemm_config(rows))
    r["best_tflops"] = flop / r["best_us"] / 1e6
    out = {"int4_gemm": r}
    wb = w.to(torch.bfloat16)
    out["bf16_cublas_tflops"] = flop / time_cycle([lambda: F.linear(x, wb)]) / 1e12
    wq, ws = quantize_fp8(w)

    def fp8_mm() -> torch.Tensor:
        xq, xs = fp8_act.quantize_rows(x)
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)

    if smoke:
        fp8_mm()  # the call itself, not its speed
        return out

    out["fp8_scaled_mm_tflops"] = flop / time_cycle([fp8_mm]) / 1e12  # activation quantization included
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1", help="GEMV rows to tune")
    ap.add_argument("--prefill-rows", type=int, default=2560)
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    ap.add_argument("--gemm", action="store_true", help="also the int4 GEMM at --prefill-rows")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "quant_sweep.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and configs on the CPU (Triton interpreter)")
    ap.add_argument("--only-dot", action="store_true",
                    help="the tensor-core GEMVs only (SWAP_FP8, DOT_INT4) beside the defaults: a shorter run")
    a = ap.parse_args()
    global DEV
    if a.smoke:
        DEV = "cpu"
        SHAPES.clear()
        SHAPES["tiny"] = (48, 512)
        a.shapes, a.prefill_rows, a.rows = "tiny", 40, "1"
        torch.backends.cuda.matmul.allow_tf32 = False
    res: dict = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__}
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        for rows in map(int, a.rows.split(",")):
            res[f"{name}/m{rows}"] = r = sweep_gemv(n, k, rows, DEV, a.smoke, a.only_dot)
            print(name, rows, {kk: v for kk, v in r.items()}, flush=True)
        if a.gemm or a.smoke:
            res[f"{name}/m{a.prefill_rows}"] = r = sweep_gemm(n, k, a.prefill_rows, DEV, a.smoke)
            print(name, a.prefill_rows, r, flush=True)
    emit(res, a.out)


if __name__ == "__main__":
    main()
