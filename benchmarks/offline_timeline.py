"""Where the wall time of the offline benchmark's job goes: (c) of `phi3v bench` (64 images of the mixed
sizes x 200 tokens, prepared on 8 threads while the engine runs) once under the torch profiler, after
the same untimed warm-up as the bench. Reports GPU busy time against the wall, and the GPU's idle time
summed by the host phase that was running when the GPU went idle (labels as in ttft_timeline.py).

The profiled run is the first after the warm-up, the one the bench times; a second, unprofiled run follows
(the profiler slows the host a little). For each run: the Triton kernel variants compiled during it and
the garbage collector's pauses (either would stall the engine's thread mid-run).

Usage: python benchmarks/offline_timeline.py [--folder /tmp/phi3v-full-random] [--crops 4 16] [--out t.json]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gc
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_profile import ensure_checkpoint  # noqa: E402  (benchmarks/ is the script's folder)
from phi3v import LLM  # noqa: E402
from phi3v.bench import emit, offline_request  # noqa: E402
from ttft_timeline import PHASES, _label  # noqa: E402
from phi3v.engine import kv_cache, prefill as prefill_mod, runner  # noqa: E402
from phi3v.engine import paged_attention  # noqa: E402
from phi3v.models import gemv, kernels, phi3v as phi3v_mod  # noqa: E402

# the prefill path in finer steps than ttft_timeline's phases
MORE = [(prefill_mod.Prefiller, "prefill_one"), (prefill_mod.Prefiller, "prefill_batch"), (runner.PrefillRunner, "run"),
        (kv_cache.KVCache, "positions"), (phi3v_mod.Phi3VForCausalLM, "embed"),
        (phi3v_mod.Phi3VForCausalLM, "encode_images"), (phi3v_mod.Phi3VForCausalLM, "logits")]
LABELS = {f"phase:{a}" for _, a in PHASES + MORE}
ALLOC = ("num_device_alloc", "num_device_free", "num_sync_all_streams", "num_alloc_retries")


def idle_by_phase(prof: profile) -> dict:
    evs = prof.events()
    host = sorted((e for e in evs if e.name in LABELS and e.device_type == DeviceType.CPU),
                  key=lambda e: e.time_range.start)
    kern = sorted((e.time_range.start, e.time_range.end) for e in evs
                  if e.device_type == DeviceType.CUDA and e.name not in LABELS)
    main = {e.thread for e in host if e.name == "phase:_step"}
    t0 = min(e.time_range.start for e in host)
    t1 = max(e.time_range.end for e in host)
    if not kern:  # a CPU run (a smoke test of this script)
        return {"host_wall_ms": (t1 - t0) / 1000, "kernels": 0}
    busy, end, idle, gaps = 0.0, kern[0][0], defaultdict(float), []
    starts = [e.time_range.start for e in host]
    for s, e in kern:
        if s > end + 20:  # idle stretches of over 20 us
            # the innermost phase of the engine's thread running when the GPU ran dry ("-": none, i.e.
            # LLM.run's loop: detokenising, adding requests, waiting for a preparation)
            running = [h for h in host[: bisect.bisect_right(starts, end)] if h.time_range.end >= end and h.thread in main]
            label = running[-1].name[6:] if running else "-"
            idle[label] += (s - end) / 1000
            gaps.append(((s - end) / 1000, round((end - t0) / 1000, 2), label))
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return {"host_wall_ms": (t1 - t0) / 1000, "gpu_first_ms": (kern[0][0] - t0) / 1000,
            "gpu_end_ms": (end - t0) / 1000, "gpu_busy_ms": busy / 1000, "kernels": len(kern),
            "idle_ms_by_host_phase": dict(sorted(((k, round(v, 2)) for k, v in idle.items()), key=lambda x: -x[1])),
            "largest_gaps_ms_at_ms_phase": sorted(gaps, reverse=True)[:12]}


def triton_variants() -> dict[str, int]:
    """Compiled variants per Triton kernel of phi3v (0 where this Triton keeps its cache elsewhere)."""
    out = {}
    for mod in (kernels, gemv, paged_attention):
        for name, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if caches is not None:
                try:
                    out[name] = sum(len(c[0]) for c in caches.values())
                except (TypeError, IndexError):
                    out[name] = 0
    return out


class GCPauses:
    """The garbage collector's pauses over 1 ms while active, as (ms, generation)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int]] = []
        self._t = 0.0
        self.on = False
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self.on and (ms := (time.perf_counter() - self._t) * 1000) > 1.0:
            self.pauses.append((round(ms, 2), info["generation"]))


def run_once(llm: LLM, jobs: list, sync, gcp: GCPauses) -> tuple[float, dict]:
    """Wall seconds of one job, with the Triton variants compiled and GC pauses during it."""
    before = triton_variants()
    gcp.pauses, gcp.on = [], True
    t = time.perf_counter()
    llm.generate_many(jobs)
    sync()
    wall = time.perf_counter() - t
    gcp.on = False
    after = triton_variants()
    new = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    return wall, {"triton_variants_compiled": new, "gc_pauses_ms_gen": sorted(gcp.pauses, reverse=True)[:10],
                  "gc_ms": round(sum(p for p, _ in gcp.pauses), 2)}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/phi3v-full-random")
    ap.add_argument("--crops", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ensure_checkpoint(a.folder)
    llm = LLM(a.folder, device=a.device, max_num_seqs=64, max_model_len=3072)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    llm.warmup()
    for owner, name in PHASES + MORE:
        _label(owner, name)
    res: dict = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else a.device,
                 "date": time.strftime("%Y-%m-%d"), "n": a.n}
    gcp = GCPauses()
    for nc in a.crops:
        job = functools.partial(offline_request, llm, nc=nc)
        llm.generate_many([functools.partial(job, a.n + i, 2) for i in range(a.n)])  # warm-up, as the bench
        sync()
        before = torch.cuda.memory_stats() if a.device == "cuda" else {}
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
        with profile(activities=acts) as prof:
            wall, first = run_once(llm, [functools.partial(job, i, a.tokens) for i in range(a.n)], sync, gcp)
        after = torch.cuda.memory_stats() if a.device == "cuda" else {}
        plain, second = run_once(llm, [functools.partial(job, 3 * a.n + i, a.tokens) for i in range(a.n)], sync, gcp)
        res[f"nc{nc}"] = {"profiled_wall_s": wall, **first, **idle_by_phase(prof),
                          "allocator_calls": {k: after.get(k, 0) - before.get(k, 0) for k in ALLOC},
                          "second_run": {"unprofiled_wall_s": plain, **second}}
        print(nc, res[f"nc{nc}"], flush=True)
    emit(res, a.out)


if __name__ == "__main__":
    main()
