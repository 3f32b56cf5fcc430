"""Sweep the small-M Triton GEMV (phi3v.kernels.gemv) against cuBLAS (F.linear) on Phi-3-mini's decode shapes
(GPU, bf16), and print a BEST table for gemv.py.

Every timing replays a CUDA graph that runs the op over distinct weight copies (32 like the 32 layers; 4 for
lm_head), so one pass reads 0.6-3.2 GB, far past the 50 MB L2: HBM-bound like a real decode step. The median
of --reps replays (CUDA events) is reported per call and as weight bytes / time (TB/s).
Candidates: a coarse grid at num_warps=4, then the best --top per (shape, M) with num_warps and num_stages
varied (num_stages only changes the tl.dot path: Triton does not pipeline the FMA path's loads). Each
candidate's output is checked against F.linear first. Kernels are compiled ahead by --jobs worker processes
into Triton's on-disk cache, so the main process only loads them.
Last, a whole M=1 decode's GEMVs (32 x (qkv, o, gate_up, down) + lm_head) in one graph: cuBLAS, the best
Triton config per shape, the faster of the two per shape, and gemv.py's current table.

Usage: python benchmarks/gemv_sweep.py [--quick] [--m 1 2 4 8] [--json-out benchmarks/results/gemv_sweep.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v.bench import graph_ms  # noqa: E402
from phi3v.kernels import gemv  # noqa: E402
from phi3v.kernels.gemv import GemvConfig  # noqa: E402

# name: (N, K, copies) for Phi-3-mini (hidden 3072, intermediate 8192, 32 heads, vocab 32064)
SHAPES = {"qkv": (9216, 3072, 32), "o_proj": (3072, 3072, 32), "gate_up": (16384, 3072, 32),
          "down": (3072, 8192, 32), "lm_head": (32064, 3072, 4)}
LAYER = ("qkv", "o_proj", "gate_up", "down")
N_SM = 132
DTYPE = torch.bfloat16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", default=None, help="write the results here as JSON")
    ap.add_argument("--quick", action="store_true", help="a small grid and no refine pass (a smoke run)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8], help="batch rows to sweep (1..8)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=20, help="graph replays per timing (median)")
    ap.add_argument("--top", type=int, default=3, help="coarse winners per (shape, M) refined")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile processes (0: none)")
    a = ap.parse_args(argv)
    assert all(1 <= m <= gemv.MAX_M for m in a.m), a.m
    return a


# ---- candidates -------------------------------------------------------------------------------------------

def splits_of(cfg: GemvConfig, k: int) -> int:
    """The number of K splits linear() launches (it drops empty ones), as in gemv.linear."""
    kps = -(-(-(-k // cfg.split_k)) // cfg.block_k) * cfg.block_k
    return -(-k // kps)


def plausible(cfg: GemvConfig, m: int, n: int, k: int) -> bool:
    threads = 32 * cfg.num_warps
    if -(-n // cfg.block_n) * splits_of(cfg, k) < N_SM:  # under one program per SM
        return False
    if cfg.split_k > 1 and (splits_of(cfg, k) == 1 or -(-n // cfg.block_n) >= 4 * N_SM):
        return False  # the same launch as split_k=1, or enough programs without a second kernel
    if cfg.dot:  # x padded to 16 rows; W and x tiles staged in shared memory, num_stages deep
        smem = cfg.num_stages * (16 + cfg.block_n) * cfg.block_k * 2
        return smem <= 160 * 1024 and cfg.block_n * cfg.block_k >= 8 * threads
    m_pad = 1 << (m - 1).bit_length()
    per_thread = m_pad * cfg.block_n * cfg.block_k / threads  # fp32 accumulators: > 128 spills (sm_90 ptxas)
    return cfg.num_stages == 1 and cfg.block_n * cfg.block_k >= 8 * threads and per_thread <= 128


def coarse(m: int, n: int, k: int, quick: bool) -> list[GemvConfig]:
    if quick:
        fma = [GemvConfig(4, 1024, 1, 4, 1), GemvConfig(2, 2048, 1, 4, 1), GemvConfig(8, 512, 4, 4, 1)]
        dot = [GemvConfig(bn, 128, s, 4, 3, True) for bn in (32, 64) for s in (1, 4)]
    else:  # the FMA path's grid reaches past the brief's (bn 4..64, bk 128..1024): M=1 won at bn 4, bk 1024
        fma = [GemvConfig(bn, bk, s, 4, 1) for bn in (1, 2, 4, 8, 16, 32, 64) for bk in (128, 256, 512, 1024, 2048)
               for s in (1, 2, 4, 8)]
        dot = [GemvConfig(bn, bk, s, 4, 3, True) for bn in (16, 32, 64) for bk in (128, 256, 512) for s in (1, 2, 4, 8)]
    return [c for c in fma + dot if plausible(c, m, n, k)]


def refine(best: list[GemvConfig], m: int, n: int, k: int, seen: set[GemvConfig]) -> list[GemvConfig]:
    out = []
    for c in best:
        for w in (2, 4, 8):
            for st in ((1, 2, 3, 4) if c.dot else (1,)):
                r = dataclasses.replace(c, num_warps=w, num_stages=st)
                if r not in seen and r not in out and plausible(r, m, n, k):
                    out.append(r)
    return out


# ---- compiling ahead ---------------------------------------------------------------------------------------

def _compile_chunk(jobs: list[tuple[int, int, tuple]]) -> tuple[int, int]:
    """Worker: run linear() once per config on small stand-ins that get the same Triton specialization as
    the real shapes (N, K multiples of 16, M == 1 or not, the same number of splits), filling the disk cache."""
    ok = bad = 0
    for m, splits, fields in jobs:
        cfg = GemvConfig(*fields)
        k = splits * cfg.block_k
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        w = torch.randn(64, k, device="cuda", dtype=DTYPE)
        try:
            gemv.linear(x, w, dataclasses.replace(cfg, split_k=splits))
            ok += 1
        except Exception:  # noqa: BLE001 - reported by the main process's own try
            bad += 1
    torch.cuda.synchronize()
    return ok, bad


def precompile(cands: list[tuple[int, int, GemvConfig]], jobs: int) -> None:
    """cands: (m, k, cfg); compiles each distinct specialization once, in parallel."""
    keys = sorted({(m if m == 1 or not c.dot else 2, splits_of(c, k), dataclasses.astuple(c)) for m, k, c in cands})
    if jobs <= 0 or not keys:
        return
    t = time.perf_counter()
    chunks = [keys[i::jobs] for i in range(jobs)]
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        res = list(ex.map(_compile_chunk, [c for c in chunks if c]))
    print(f"  precompiled {len(keys)} kernels with {jobs} processes in {time.perf_counter() - t:.1f} s "
          f"({sum(b for _, b in res)} failed)", flush=True)


# ---- timing -----------------------------------------------------------------------------------------------

def tbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


def copy_tbs(reps: int) -> float:
    src = torch.empty(1 << 29, device="cuda", dtype=DTYPE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = graph_ms(lambda: dst.copy_(src), reps)
    return tbs(2 * src.numel() * 2, ms)


def check(x: torch.Tensor, w: torch.Tensor, cfg: GemvConfig) -> float:
    """max |linear - F.linear| / max |F.linear| in fp32 (raises if the config cannot launch)."""
    ref = F.linear(x, w).float()
    return ((gemv.linear(x, w, cfg).float() - ref).abs().max() / ref.abs().max()).item()


def time_cfgs(x: torch.Tensor, ws: list[torch.Tensor], cfgs: list[GemvConfig], reps: int) -> dict:
    """cfg -> us per call, for those within 2e-2 of F.linear; failures and wrong ones are counted."""
    res, skipped = {}, 0
    for c in cfgs:
        try:
            err = check(x, ws[0], c)
            if not err < 2e-2:
                print(f"    wrong ({err:.3g}): {c}", flush=True)
                skipped += 1
                continue
            res[c] = 1e3 * graph_ms(lambda: [gemv.linear(x, w, c) for w in ws], reps) / len(ws)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip the config
            print(f"    failed ({type(e).__name__}: {str(e)[:80]}): {c}", flush=True)
            skipped += 1
    return {"us": res, "skipped": skipped}


# ---- main -------------------------------------------------------------------------------------------------

def cfg_dict(c: GemvConfig | None) -> dict | None:
    return None if c is None else dataclasses.asdict(c)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    assert torch.cuda.is_available() and gemv.HAVE_TRITON, "needs CUDA and Triton"
    import triton

    t0 = time.perf_counter()
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                 "date": time.strftime("%Y-%m-%d"), "quick": a.quick, "reps": a.reps, "results": [], "decode": {}}
    grids = {(s, m): coarse(m, *SHAPES[s][:2], a.quick) for s in a.shapes for m in a.m}
    print(f"coarse pass: {sum(map(len, grids.values()))} candidates", flush=True)
    precompile([(m, SHAPES[s][1], c) for (s, m), cs in grids.items() for c in cs], a.jobs)

    torch.manual_seed(0)
    ws = {s: [torch.randn(SHAPES[s][:2], device="cuda", dtype=DTYPE).mul_(0.02) for _ in range(SHAPES[s][2])]
          for s in a.shapes}
    xs = {(k, m): torch.randn(m, k, device="cuda", dtype=DTYPE) for k in (3072, 8192) for m in a.m}
    out["copy_tbs"] = copy_tbs(a.reps)
    print(f"copy: {out['copy_tbs']:.2f} TB/s (read + write of 1 GiB)", flush=True)

    timed: dict = {}
    for (s, m), cs in grids.items():
        n, k, _ = SHAPES[s]
        x = xs[(k, m)]
        cub = 1e3 * graph_ms(lambda: [F.linear(x, w) for w in ws[s]], a.reps) / len(ws[s])
        timed[(s, m)] = {"cublas_us": cub, **time_cfgs(x, ws[s], cs, a.reps)}
        best = min(timed[(s, m)]["us"].items(), key=lambda kv: kv[1], default=(None, float("nan")))
        print(f"  {s:8s} M={m}: cuBLAS {cub:7.2f} us, coarse best {best[1]:7.2f} us {best[0]} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    if not a.quick:
        extra = {}
        for (s, m), r in timed.items():
            top = sorted(r["us"], key=r["us"].get)[: a.top]
            extra[(s, m)] = refine(top, m, *SHAPES[s][:2], set(r["us"]))
        print(f"refine pass: {sum(map(len, extra.values()))} candidates", flush=True)
        precompile([(m, SHAPES[s][1], c) for (s, m), cs in extra.items() for c in cs], a.jobs)
        for (s, m), cs in extra.items():
            n, k, _ = SHAPES[s]
            r = time_cfgs(xs[(k, m)], ws[s], cs, a.reps)
            timed[(s, m)]["us"].update(r["us"])
            timed[(s, m)]["skipped"] += r["skipped"]
        print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)

    best_cfg: dict = {}
    print(f"\n{'shape':8s} {'M':>2s} {'N':>6s} {'K':>5s} | {'cuBLAS us':>9s} {'TB/s':>5s} | "
          f"{'Triton us':>9s} {'TB/s':>5s} | {'speedup':>7s} | config")
    for (s, m), r in timed.items():
        n, k, _ = SHAPES[s]
        nbytes = n * k * 2
        ranked = sorted(r["us"].items(), key=lambda kv: kv[1])
        c, us = ranked[0] if ranked else (None, float("nan"))
        best_cfg[(s, m)] = (c, r["cublas_us"] / us if c else 0.0)
        row = {"shape": s, "M": m, "N": n, "K": k, "copies": SHAPES[s][2], "cublas_us": r["cublas_us"],
               "cublas_tbs": tbs(nbytes, r["cublas_us"] * 1e-3), "best": cfg_dict(c), "best_us": us,
               "best_tbs": tbs(nbytes, us * 1e-3), "speedup": r["cublas_us"] / us, "n_timed": len(ranked),
               "n_skipped": r["skipped"], "top5": [{"config": cfg_dict(cc), "us": u} for cc, u in ranked[:5]]}
        out["results"].append(row)
        print(f"{s:8s} {m:2d} {n:6d} {k:5d} | {row['cublas_us']:9.2f} {row['cublas_tbs']:5.2f} | {us:9.2f} "
              f"{row['best_tbs']:5.2f} | {row['speedup']:6.3f}x | {c}")

    for m in a.m:  # whole decode: needs every shape swept at this M
        if not all((s, m) in best_cfg and best_cfg[(s, m)][0] for s in (*LAYER, "lm_head")):
            continue
        x3, x8 = xs[(3072, m)], xs[(8192, m)]
        seq = [(s, i) for i in range(32) for s in LAYER] + [("lm_head", 0)]
        nbytes = sum(SHAPES[s][0] * SHAPES[s][1] * 2 for s, _ in seq)

        def run(pick) -> float:
            return graph_ms(lambda: [pick(s)(x8 if s == "down" else x3, ws[s][i]) for s, i in seq], a.reps)

        def tri(s):
            return lambda x, w: gemv.linear(x, w, best_cfg[(s, m)][0])

        res = {"cublas_ms": run(lambda s: F.linear), "triton_ms": run(tri),
               "best_of_ms": run(lambda s: tri(s) if best_cfg[(s, m)][1] > 1 else F.linear),
               "table_ms": run(lambda s: gemv.linear), "gbytes": nbytes / 1e9}  # table: gemv.py's BEST as it is
        for key in ("cublas", "triton", "best_of", "table"):
            res[f"{key}_tbs"] = tbs(nbytes, res[f"{key}_ms"])
        out["decode"][f"M={m}"] = res
        print(f"\nwhole decode M={m} ({nbytes / 1e9:.2f} GB): cuBLAS {res['cublas_ms']:.3f} ms "
              f"({res['cublas_tbs']:.2f} TB/s), Triton {res['triton_ms']:.3f} ms ({res['triton_tbs']:.2f} TB/s), "
              f"best of both {res['best_of_ms']:.3f} ms ({res['best_of_tbs']:.2f} TB/s), "
              f"gemv.py's table now {res['table_ms']:.3f} ms ({res['table_tbs']:.2f} TB/s)")

    # the table as gemv.py holds it: shapes and names, no timings (the speedups are in the table above and the JSON)
    print(f"\n# (M, N, K): GemvConfig(block_n, block_k, split_k, num_warps, num_stages, dot)\n"
          f"# tuned on {out['device']}, bf16, {time.strftime('%Y-%m-%d')}, benchmarks/gemv_sweep.py\n"
          "BEST: dict[tuple[int, int, int], GemvConfig] = {")
    for (s, m), (c, _) in best_cfg.items():
        if c is not None:
            print(f"    ({m}, {SHAPES[s][0]}, {SHAPES[s][1]}): GemvConfig{dataclasses.astuple(c)},  # {s}")
    print("}")
    out["sweep_s"] = time.perf_counter() - t0
    print(f"\nsweep took {out['sweep_s']:.0f} s")
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
