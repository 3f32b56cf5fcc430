"""Can prefill overlap decode on one GPU? Decode steps (bandwidth-bound: weights + every row's KV)
on one CUDA stream, whole-image prefills (compute-bound: vision tower + decoder over the prompt) on
another; each alone, then both launched together. If the together-time is well under the sum, an
engine that prefills new requests on a second stream while the batch decodes gains (c) throughput.

Usage: python benchmarks/overlap_probe.py [--folder /tmp/phi3v-full-random] [--out probe.json]

On the H100 (2026-11-25) the 16-crop case saved 3 %; the 4-crop case, where both streams replay CUDA
graphs, hung in `graph.replay()` and the watchdog (--watchdog, default 330 s) ended the run after
dumping every thread's stack. --only 16c skips it.

--carveout N [N ...]: also time the two streams with cuBLAS(Lt) told to leave N SMs free
(`torch._C._set_sm_carveout_experimental`, all GEMMs routed through cuBLASLt), so that the prefill's
GEMMs cannot take every SM and the decode kernels (Triton, high priority) always find some: does
partitioning the SMs buy the overlap that plain streams do not?
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decode_profile import ensure_checkpoint  # noqa: E402  (benchmarks/ is the script's folder)
from phi3v import LLM  # noqa: E402
from phi3v.engine.kv_cache import PrefillAttention  # noqa: E402

# (crops incl. the global one, prompt tokens, decode batch, decode context) of the bench's (c)
CASES = {"16c": (17, 2541, 48, 2447), "4c": (5, 789, 64, 900)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/phi3v-full-random")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prefills", type=int, default=10)
    ap.add_argument("--only", choices=sorted(CASES), default=None, help="run one case")
    ap.add_argument("--watchdog", type=float, default=330, help="dump every thread's stack and exit after this many s")
    ap.add_argument("--carveout", type=int, nargs="*", default=[], help="SMs that cuBLAS leaves free (extra runs)")
    a = ap.parse_args()
    faulthandler.dump_traceback_later(a.watchdog, exit=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    ensure_checkpoint(a.folder)
    log("checkpoint ready")
    llm = LLM(a.folder, device="cuda", max_num_seqs=64, max_model_len=3072)
    eng, model = llm.engine, llm.model
    cache, dev = eng.cache, torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "cases": {}}
    log("model loaded")
    g = torch.Generator(device="cuda").manual_seed(0)
    cache.k.normal_(generator=g)  # not zeros: real-looking data
    cache.v.normal_(generator=g)
    for name, (crops, T, B, ctx) in CASES.items():
        if a.only and name != a.only:
            continue
        nb = -(-(ctx + 1) // cache.block_size)
        bt = torch.arange(B * nb, dtype=torch.int32, device=dev).view(B, nb)
        bt = torch.cat([bt, bt.new_full((B, eng.runner.max_blocks - nb), cache.scratch)], 1)
        tokens = torch.randint(0, 30000, (B,), device=dev)
        lengths = torch.full((B,), ctx, device=dev)
        flags = torch.zeros(B, dtype=torch.bool, device=dev)
        base = B * nb  # the prefill's blocks follow the decode rows'
        blk = torch.tensor([base + p // cache.block_size for p in range(T)], device=dev)
        off = torch.arange(T, device=dev) % cache.block_size
        pixels = torch.randn(crops, 3, 336, 336, device=dev, dtype=eng.dtype)
        embeds = torch.randn(T, llm.config.hidden_size, device=dev, dtype=eng.dtype)
        flag = torch.zeros(1, dtype=torch.bool, device=dev)

        def decode() -> None:
            eng.runner.decode(tokens, lengths, flags, bt, ctx + 1)

        @torch.inference_mode()
        def prefill() -> None:
            eng.vision_runner(pixels)
            if eng.prefill_runner.run(embeds, flag, blk, off) is None:
                attn = PrefillAttention(cache, blk, off, 0)
                h = model(embeds[None], torch.arange(T, device=dev)[None], flag, attn)
                model.logits(h[:, -1])

        def timed(n_d: int, n_p: int, sd: torch.cuda.Stream, sp: torch.cuda.Stream) -> float:
            torch.cuda.synchronize()
            t = time.perf_counter()
            every = max(1, n_d // max(n_p, 1))
            launched = 0
            with torch.inference_mode():
                for i in range(max(n_d, 1)):
                    if i < n_d:
                        with torch.cuda.stream(sd):
                            decode()
                    if launched < n_p and i % every == 0:
                        with torch.cuda.stream(sp):
                            prefill()
                        launched += 1
                while launched < n_p:
                    with torch.cuda.stream(sp):
                        prefill()
                    launched += 1
            torch.cuda.synchronize()
            return (time.perf_counter() - t) * 1e3

        with torch.inference_mode():
            for _ in range(3):  # captures, compiles
                decode()
                prefill()
        torch.cuda.synchronize()
        log(f"{name}: warmed up")
        r: dict = {}
        for prio in (0, -1):
            sd = torch.cuda.Stream(priority=prio)
            sp = torch.cuda.Stream(priority=0)
            d = min(timed(a.steps, 0, sd, sp) for _ in range(2))
            p = min(timed(0, a.prefills, sd, sp) for _ in range(2))
            both = min(timed(a.steps, a.prefills, sd, sp) for _ in range(2))
            same = min(timed(a.steps, a.prefills, sd, sd) for _ in range(2))  # one stream: no overlap
            r[f"decode_prio{prio}"] = {"decode_ms": d, "prefill_ms": p, "two_streams_ms": both,
                                       "one_stream_ms": same, "saved_frac": 1 - both / (d + p)}
            log(f"{name} prio {prio}: decode {d:.1f} ms ({a.steps} steps of batch {B}), prefill {p:.1f} ms "
                  f"({a.prefills} x {T} tok), one stream {same:.1f}, two streams {both:.1f} "
                  f"(saved {100 * (1 - both / (d + p)):.0f} %)")
        for n in a.carveout:  # the prefill's GEMMs on 132 - n SMs; the decode stream at high priority
            torch.backends.cuda.preferred_blas_library("cublaslt")
            torch._C._set_sm_carveout_experimental(n)
            sd, sp = torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)
            p = min(timed(0, a.prefills, sd, sp) for _ in range(2))
            both = min(timed(a.steps, a.prefills, sd, sp) for _ in range(2))
            d = r["decode_prio-1"]["decode_ms"]
            r[f"carveout{n}"] = {"decode_ms": d, "prefill_ms": p, "two_streams_ms": both,
                                 "saved_frac_vs_full_gpu_sum": 1 - both / (d + r["decode_prio-1"]["prefill_ms"])}
            log(f"{name} carveout {n} SMs: prefill {p:.1f} ms, two streams {both:.1f} (against {d:.1f} + "
                f"{r['decode_prio-1']['prefill_ms']:.1f} one after the other on the whole GPU)")
            torch._C._set_sm_carveout_experimental(None)
            torch.backends.cuda.preferred_blas_library("cublas")
        res["cases"][name] = r
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
