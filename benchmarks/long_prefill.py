"""Long-prompt prefill attention alone (GPU): one layer's attention over a whole chunked prefill at
Phi-3-vision's shapes (32 heads x 96, bf16, 64-token blocks), old path against the paged kernel.

For each total length (35k, 107k tokens) and prefill chunk (2048 ... 16384), the prompt's chunks run
one after the other through `PrefillAttention` (the engine's call, its K/V store included) under
three modes of phi3v/kernels/paged_prefill.py:
  off   every later chunk gathers the whole past from the cache, concatenates, SDPA (lower-right causal)
  past  later chunks take the paged kernel (reads the past in place); the first chunk SDPA (the default)
  all   every chunk takes the kernel
Then a sweep of kernel configs (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant flags]; `--tma`: SWEEP_TMA, the
TMA and Gluon variants, beside the default config) in the `--mode` mode, each checked against the old path's output
for the last chunk (nan: wrong, or the config's variant did not run). Times: one layer, milliseconds, the median
of `--reps` runs after a warm-up (Triton compiles there); `x32 s` = 32 layers' worth in seconds,
TFLOP/s counts the causal pairs only (4 * D * heads per query-key pair).

Usage: python benchmarks/long_prefill.py [--small] [--kv bf16|fp8] [--totals 35000,107000]
       [--chunks 2048,4096,8192,16384] [--configs 128,64,8,3 64,64,4,3 ...] [--tma] [--mode past] [--no-sweep]
       [--out results/long_prefill.json]
The best config prints as a PHI3V_PREFILL_ATTN_CONFIG line (or edit CONFIGS in paged_prefill.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3v.bench import cuda_median_ms, emit  # noqa: E402
from phi3v.kernels import paged_prefill  # noqa: E402
from phi3v.engine.kv_cache import FP8, KVCache, PrefillAttention, PrefillKernelOptions  # noqa: E402
from phi3v.kernels.paged_prefill import PrefillConfig  # noqa: E402

H, D, BS, DEV, DT = 32, 96, 64, "cuda", torch.bfloat16
# configs that compile for sm90 without spilling (benchmarks/prefill_compile.py: 128,64,4,3 and 256,64,8,3 spill)
SWEEP = ["128,64,8,3", "128,64,8,2", "128,64,8,4", "128,128,8,3", "128,128,8,2", "128,32,4,3", "64,64,4,3",
         "64,32,4,4"]
# the TMA variant (phi3v/kernels/prefill_hopper.py; sm90): two or three programs per SM, so that one program's softmax
# runs beside another's wgmma (one warpgroup of 128 or 64 queries, or 8 warps under a 128-register cap ',r128'), key
# tiles of one or two cache blocks, head_dim padded to one box of 128 (',pad') against 64 + 32; then the Gluon kernel
# (phi3v/kernels/prefill_gluon.py: the softmax of one tile beside the wgmma of the previous). Each compiles for sm90
# without spills (benchmarks/prefill_compile.py, docs/perf-log.md 2026-12-05)
SWEEP_TMA = ["128,128,8,2,tma", "128,64,4,2,tma", "128,64,4,3,tma", "128,32,4,2,tma", "128,64,8,2,tma,r128",
             "128,64,8,3,tma,r128", "64,128,4,2,tma", "64,64,4,2,tma", "128,128,8,2,tma,pad",
             "128,64,4,2,gluon", "64,64,4,2,gluon", "64,64,4,3,gluon"]


class Prompt:
    """One sequence's chunked prefill through one layer: its cache places, chunks and per-chunk q/k/v."""

    def __init__(self, cache: KVCache, total: int, chunk: int) -> None:
        self.cache, self.total = cache, total
        g = torch.Generator().manual_seed(0)
        blocks = torch.randperm(cache.n_blocks, generator=g)[: -(-total // BS)].tolist()  # scattered, as in use
        where = cache.slots(blocks, 0, total).to(DEV)  # (2, total)
        self.calls = []
        for s in range(0, total, chunk):
            e = min(s + chunk, total)
            past = (where[0, :s], where[1, :s]) if s else None
            attn = PrefillAttention(cache, where[0, s:e], where[1, s:e], s, past, vary=True, kernel=MODE)
            qkv = torch.randn(1, e - s, 3 * H * D, device=DEV, dtype=DT)  # as the model's qkv_proj
            heads = qkv.view(1, e - s, 3 * H, D).transpose(1, 2)  # (1, 3H, T, D) views
            self.calls.append((attn, heads[:, :H], heads[:, H: 2 * H], heads[:, 2 * H:]))
        # causal pairs: query i of a chunk at s sees s + i + 1 keys
        self.pairs = sum((e - s) * s + (e - s) * (e - s + 1) // 2
                         for s, e in ((s, min(s + chunk, total)) for s in range(0, total, chunk)))

    def run(self) -> torch.Tensor:
        o = None
        for attn, q, k, v in self.calls:
            attn.kernel = MODE  # the mode with_mode set (the objects are built once, in __init__)
            o = attn(0, q, k, v)
        return o  # the last chunk's output

    def time_ms(self, reps: int) -> float:
        self.run()  # warm-up: compiles, and fills the cache for every chunk's past
        if DEV == "cpu":  # --small: a dry run of the script in the interpreter, nothing to time
            return 1.0
        return cuda_median_ms(self.run, reps)

    def tflops(self, ms: float) -> float:
        return 4 * D * H * self.pairs / ms / 1e9


MODE = PrefillKernelOptions()  # what Prompt.run's PrefillAttention uses (EngineConfig.paged_prefill in the engine)


def with_mode(mode: str, fn):
    global MODE
    old, MODE = MODE, PrefillKernelOptions(mode)
    try:
        return fn()
    finally:
        MODE = old


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--totals", default="35000,107000")
    ap.add_argument("--chunks", default="2048,4096,8192,16384")
    ap.add_argument("--configs", nargs="*", default=None, help="default: SWEEP (or the default config + SWEEP_TMA)")
    ap.add_argument("--tma", action="store_true", help="sweep the TMA variant (SWEEP_TMA) beside the default config")
    ap.add_argument("--skip-variant", default="", help="leave this variant's configs out of --tma (e.g. gluon)")
    ap.add_argument("--mode", choices=("past", "all"), default="past", help="mode of the config sweep")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="tiny fp32 shapes on the CPU (TRITON_INTERPRET=1): a dry run")
    a = ap.parse_args()
    if a.small:
        global H, D, BS, DEV, DT
        H, D, BS, DEV, DT = 2, 48, 16, "cpu", torch.float32
        a.totals, a.chunks, a.reps = "150", "64,96", 1
        a.configs = ["32,16,4,1", "16,16,4,1"] + (["32,32,4,1,tma"] if a.tma else [])
    if a.configs is None:
        tma = [t for t in SWEEP_TMA if not a.skip_variant or PrefillConfig.parse(t).variant != a.skip_variant]
        a.configs = [paged_prefill.CONFIGS["bf16"].text()] + tma if a.tma else SWEEP
    totals = [int(x) for x in a.totals.split(",")]
    chunks = [int(x) for x in a.chunks.split(",")]
    cache = KVCache(1, -(-max(totals) // BS) + 8, BS, H, D, DEV, DT, FP8 if a.kv == "fp8" else None)
    assert cache.triton, "needs Triton on CUDA"
    key = paged_prefill.config_key(cache.k[0, :1, 0, 0].to(DT), cache.k)
    default = paged_prefill.CONFIGS[key]
    res = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV, "kv": a.kv,
           "default_config": default.text(), "cases": [], "sweep": []}
    print(f"{'total':>7} {'chunk':>6} {'off ms':>8} {'past ms':>8} {'all ms':>8} {'speedup':>7} {'TFLOP/s':>7} "
          f"{'x32 s':>6} {'max|d|':>8}")
    for total in totals:
        for chunk in chunks:
            p = Prompt(cache, total, chunk)
            off = with_mode("off", lambda: p.time_ms(a.reps))
            ref = with_mode("off", p.run).float()
            past = with_mode("past", lambda: p.time_ms(a.reps))
            allk = with_mode("all", lambda: p.time_ms(a.reps))
            diff = (with_mode("past", p.run).float() - ref).abs().max().item()
            best = min(past, allk)
            res["cases"].append({"total": total, "chunk": chunk, "off_ms": off, "past_ms": past, "all_ms": allk,
                                 "tflops_past": p.tflops(past), "max_abs_diff": diff})
            print(f"{total:>7} {chunk:>6} {off:>8.1f} {past:>8.1f} {allk:>8.1f} {off / best:>6.2f}x "
                  f"{p.tflops(best):>7.0f} {32 * best / 1000:>6.2f} {diff:>8.1e}", flush=True)
            del p
    if not a.no_sweep:
        sweep(a, cache, key, totals, chunks, res)
    emit(res, a.out)


def sweep(a, cache: KVCache, key: str, totals: list[int], chunks: list[int], res: dict) -> None:
    default = paged_prefill.CONFIGS[key]
    cases = [(t, c) for t in totals for c in chunks]
    print(f"\nconfig sweep ({a.mode} mode), ms per layer:\n{'config':>14} " +
          " ".join(f"{f'{t // 1000}k/{c}':>10}" for t, c in cases))
    prompts = {tc: Prompt(cache, *tc) for tc in cases}
    refs = {tc: with_mode("off", p.run).float() for tc, p in prompts.items()}
    scores = {}
    for text in a.configs:
        cfg = PrefillConfig.parse(text)
        paged_prefill.CONFIGS[key] = cfg
        row = []
        try:
            for tc, p in prompts.items():
                ran = paged_prefill.LAUNCHES[cfg.variant]
                ms = with_mode(a.mode, lambda: p.time_ms(a.reps))
                ran = paged_prefill.LAUNCHES[cfg.variant] > ran  # else it fell back to the pointer kernel
                diff = (with_mode(a.mode, p.run).float() - refs[tc]).abs().max().item()
                row.append(ms if diff < 5e-2 and ran else float("nan"))  # nan: wrong output, or not this variant
                res["sweep"].append({"config": text, "total": tc[0], "chunk": tc[1], "ms": ms, "max_abs_diff": diff,
                                     "variant_ran": ran})
        except Exception as e:  # e.g. out of shared memory for this tile
            print(f"{text:>14} failed: {str(e)[:100]}")
            res["sweep"].append({"config": text, "error": str(e)[:200]})
            continue
        finally:
            paged_prefill.CONFIGS[key] = default
        scores[text] = sum(row) / len(row)
        print(f"{text:>14} " + " ".join(f"{ms:>10.1f}" for ms in row), flush=True)
    ok = {k: v for k, v in scores.items() if v == v}
    if ok:
        best = min(ok, key=ok.get)
        res["best_config"] = best
        print(f"\nbest on average: {best}  ->  PHI3V_PREFILL_ATTN_CONFIG='{key}={best}'")


if __name__ == "__main__":
    main()
