"""Where the time of `phi3v bench`'s parts goes, on a full-size random checkpoint (GPU; `--device cpu` for a smoke run).

Modes (one per part of the bench; each writes one JSON with --out):
  decode   (a) one request with a 16-crop image decoding at batch 1: wall per engine step, GPU busy per step and
           the top kernels (the CUDA graphs' kernels included), and the API's decode tok/s.
  prefill  (c) one engine step that admits and prefills N prepared requests of the bench's mixed sizes, after a
           warm-up step of the same shapes: wall, summed kernel time, top kernels and CPU ops.
  ttft     (b) one `llm.generate(max_tokens=1)` per size (16 crops 1344x1344, 4 crops 672x672): the median wall
           of 5 fresh images, then one call under the profiler, its host phases lined up with the GPU's busy time
           and idle gaps; also the vision tower and the decoder prefill timed alone.
  followup (e) a follow-up question about a 16-crop image already asked about: wall median, one call under the
           profiler (host phases against the GPU's busy time), and cProfile's top host functions.
  offline  (c) the bench's offline job (N images x T tokens, prepared on threads) after the bench's warm-up, once
           under the profiler (GPU idle time summed by the engine thread's host phase, allocator calls, Triton
           compiles and GC pauses during the run), then once without it.

Usage: python benchmarks/profiler.py MODE [--folder /tmp/phi3v-full-random] [--out r.json] [MODE's options]
The folder is written (real Phi-3-vision config, random bf16 weights) when it holds no checkpoint.
Host phases are labelled by wrapping engine methods by name (PHASES): a name the engine no longer has is skipped
and listed under "phases_missing".
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gc
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams, prepare as prepare_mod  # noqa: E402
from phi3v.bench import MIXED_SIZES, PROMPT, emit, noise_image, offline_request, write_random_checkpoint  # noqa: E402
from phi3v.config import Phi3VConfig  # noqa: E402
from phi3v.engine import engine as engine_mod, images as images_mod, prefill as prefill_mod  # noqa: E402
from phi3v.engine import graphs, kv_cache, model_runner, scheduler  # noqa: E402
from phi3v.models import phi3v as phi3v_mod  # noqa: E402
from phi3v.processing import image as image_mod  # noqa: E402

DATA = ROOT / "tests" / "data"
# (owner, attribute) of every host phase that gets a profiler label
PHASES = [(prepare_mod.Preparer, "prepare"), (image_mod.ImageProcessor, "preprocess"), (image_mod, "hd_resized"),
          (image_mod, "pad_canvas"), (image_mod.ImageProcessor, "normalize"), (prepare_mod, "tokenize_prompt"),
          (prepare_mod, "read_image_source"),
          (engine_mod.Engine, "add_request"), (engine_mod.Engine, "_step"), (scheduler.Scheduler, "schedule"),
          (images_mod.ImageFeatures, "encode"), (model_runner.ModelRunner, "_embeds"),
          (prefill_mod.Prefiller, "prefill_many"), (prefill_mod.Prefiller, "prefill_range"),
          (prefill_mod.Prefiller, "prefill_batch"), (graphs.PrefillRunner, "run"), (kv_cache.KVCache, "slots"),
          (phi3v_mod.Phi3VForCausalLM, "embed"), (phi3v_mod.Phi3VForCausalLM, "encode_images"),
          (phi3v_mod.Phi3VForCausalLM, "logits"), (model_runner.ModelRunner, "sample"),
          (engine_mod.Engine, "_commit")]
ALLOC = ("num_device_alloc", "num_device_free", "num_sync_all_streams", "num_alloc_retries")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def activities(device: str) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])


def label_phases() -> list[str]:
    """Wraps every PHASES method in a profiler range `phase:NAME`; returns the names that were not found."""
    missing = []
    for owner, name in PHASES:
        fn = getattr(owner, name, None)
        if fn is None:
            missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
            continue

        def wrapped(*args: Any, _fn: Callable = fn, _name: str = name, **kwargs: Any) -> Any:
            with record_function(f"phase:{_name}"):
                return _fn(*args, **kwargs)

        setattr(owner, name, functools.wraps(fn)(wrapped))
    return missing


def top_kernels(prof: profile, n: int, per: int = 1) -> list[tuple[str, int, float]]:
    """(name, calls, ms) of the n kernels with the most device time, divided by `per` (e.g. steps)."""
    rows = [(ev.key[:70], ev.count // per, ev.self_device_time_total / 1000 / per) for ev in prof.key_averages()
            if ev.self_device_time_total > 0]  # kernels (ops have no self device time)
    return sorted(rows, key=lambda x: -x[2])[:n]


def gpu_timeline(prof: profile, gap_us: float = 20.0) -> dict:
    """GPU busy time against the host's labelled phases, ms from the first phase's start. Each GPU idle stretch over
    `gap_us` is charged to the innermost phase the engine's thread (the one running `_step`) was in when the GPU
    ran dry; "-" is none (the API's loop: detokenising, adding requests, waiting for a preparation)."""
    evs = prof.events()
    host = sorted((e for e in evs if e.name.startswith("phase:") and e.device_type == DeviceType.CPU),
                  key=lambda e: e.time_range.start)
    kern = sorted((e.time_range.start, e.time_range.end) for e in evs
                  if e.device_type == DeviceType.CUDA and not e.name.startswith("phase:"))
    t0, t1 = min(e.time_range.start for e in host), max(e.time_range.end for e in host)
    out: dict = {"host_wall_ms": (t1 - t0) / 1000, "kernels": len(kern)}
    if not kern:  # a CPU run
        return out
    engine = {e.thread for e in host if e.name == "phase:_step"}
    starts = [e.time_range.start for e in host]
    busy, end, idle, gaps = 0.0, kern[0][0], defaultdict(float), []
    for s, e in kern:
        if s > end + gap_us:
            running = [h for h in host[: bisect.bisect_right(starts, end)]
                       if h.time_range.end >= end and (h.thread in engine or not engine)]
            phase = running[-1].name[6:] if running else "-"
            idle[phase] += (s - end) / 1000
            gaps.append((round((s - end) / 1000, 3), round((end - t0) / 1000, 2), phase))
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    out.update(gpu_first_ms=(kern[0][0] - t0) / 1000, gpu_end_ms=(end - t0) / 1000, gpu_busy_ms=busy / 1000,
               idle_ms_by_host_phase=dict(sorted(((k, round(v, 2)) for k, v in idle.items()), key=lambda x: -x[1])),
               largest_gaps_ms_at_ms_phase=sorted(gaps, reverse=True)[:12])
    return out


def cuda_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median wall ms of fn over reps (the first is a warm-up), synchronised."""
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(1000 * (time.perf_counter() - t))
    return statistics.median(out[1:])


def mode_decode(llm: LLM, a: argparse.Namespace) -> dict:
    eng, img = llm.engine, noise_image(1344, 1344, 0)
    req = llm.prepare(PROMPT, [img], SamplingParams(max_tokens=4000, ignore_eos=True, lora=a.lora), 16)
    rid = eng.add_request(req.prompt_ids, req.images, req.params)
    for _ in range(4):  # the prefill, then decode steps that capture or warm the batch-1 graph
        eng.step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    sync()
    res: dict = {"prompt_tokens": len(req.prompt_ids), "engine_step_ms": 1000 * (time.perf_counter() - t) / a.steps}
    with profile(activities=activities(a.device)) as prof:
        for _ in range(20):
            eng.step()
        sync()
    res["top_kernels_per_step"] = top_kernels(prof, 15, per=20)
    res["kernel_ms_per_step"] = sum(ms for _, _, ms in top_kernels(prof, 10**6, per=20))
    res["kernels_per_step"] = sum(n for _, n, _ in top_kernels(prof, 10**6, per=20))
    eng.abort(rid)
    eng.step()
    c = llm.generate(PROMPT, [img], SamplingParams(max_tokens=256, ignore_eos=True, lora=a.lora), num_crops=16)
    res["api_decode_tok_s"] = c.timings["decode_tokens_per_s"]
    return res


def _admit_and_prefill(llm: LLM, reqs: list) -> float:
    eng = llm.engine
    rids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs]
    sync()
    t = time.perf_counter()
    eng.step()  # admits and prefills them all
    sync()
    dt = time.perf_counter() - t
    for rid in rids:
        eng.abort(rid)
    eng.step()
    return dt


def mode_prefill(llm: LLM, a: argparse.Namespace) -> dict:
    res: dict = {"n": a.n}
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    for nc in a.crops:
        prep = lambda base: [llm.prepare(PROMPT, [noise_image(*MIXED_SIZES[i % 8], base + i)], p, nc)  # noqa: E731
                             for i in range(a.n)]
        warm, reqs = prep(7000), prep(8000)
        _admit_and_prefill(llm, warm)
        with profile(activities=activities(a.device)) as prof:
            wall = _admit_and_prefill(llm, reqs)
        kernel_ms = sum(ms for _, _, ms in top_kernels(prof, 10**6))
        res[f"nc{nc}"] = {"wall_ms": 1000 * wall, "wall_ms_per_image": 1000 * wall / a.n,
                          "kernel_ms": kernel_ms, "kernel_ms_per_image": kernel_ms / a.n,
                          "tokens_per_image": sum(len(r.prompt_ids) for r in reqs) / a.n,
                          "top_kernels": top_kernels(prof, 25),
                          "top_cpu_ops": [(ev.key[:60], ev.count, ev.cpu_time_total / 1000) for ev in
                                          sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]}
    return res


def mode_ttft(llm: LLM, a: argparse.Namespace) -> dict:
    res: dict = {}
    seed, m = iter(range(1000, 2000)), llm.model
    for nc in a.crops:
        size = (1344, 1344) if nc >= 16 else (672, 672)
        gen = lambda: llm.generate(PROMPT, [noise_image(*size, next(seed))], SamplingParams(max_tokens=1),  # noqa: E731
                                   num_crops=nc)
        r: dict = {"wall_ms_median": cuda_ms(gen, a.reps)}  # a new image each call: no embedding-cache hit
        with profile(activities=activities(a.device)) as prof:
            gen()
            sync()
        r["profiled"] = gpu_timeline(prof, gap_us=50.0)
        # the GPU parts alone (eager; the engine replays the tower's graphs where it has them)
        p = llm.image_processor.preprocess(noise_image(*size, 7), nc, device=a.device)
        req = llm.prepare(PROMPT, [noise_image(*size, 7)], SamplingParams(max_tokens=1), nc)
        ids = torch.tensor(req.prompt_ids, device=a.device)
        feats = m.encode_images([p.crops], [p.image_size])
        emb = m.embed(ids, feats)
        pos, flag = torch.arange(emb.shape[0], device=a.device)[None], torch.tensor([False], device=a.device)
        prepare = lambda: llm.prepare(PROMPT, [noise_image(*size, next(seed))], SamplingParams(max_tokens=1), nc)  # noqa: E731
        r.update(prompt_tokens=emb.shape[0], prepare_ms=cuda_ms(prepare, a.reps),
                 vision_eager_ms=cuda_ms(lambda: m.encode_images([p.crops], [p.image_size]), a.reps),
                 embed_ms=cuda_ms(lambda: m.embed(ids, feats), a.reps),
                 decoder_prefill_eager_ms=cuda_ms(lambda: m.logits(m(emb[None], pos, flag, None)[:, -1]), a.reps))
        res[f"nc{nc}"] = r
    return res


def mode_followup(llm: LLM, a: argparse.Namespace) -> dict:
    """(e) a follow-up question about a 16-crop image already asked about: wall median, one call under the
    profiler (host phases against GPU busy time) and the host's own hot spots (cProfile, top 30 by cumulative)."""
    import cProfile
    import io
    import pstats

    q2 = "<|user|>\n<|image_1|>\nWhat is in the top left corner?<|end|>\n<|assistant|>\n"
    seed = iter(range(3000, 4000))

    def pair() -> Callable[[], Any]:
        img = noise_image(1344, 1344, next(seed))
        llm.generate(PROMPT, [img], SamplingParams(max_tokens=64, ignore_eos=True), num_crops=16)
        sync()
        return lambda: llm.generate(q2, [img], SamplingParams(max_tokens=1), num_crops=16)

    walls = []
    for _ in range(a.reps):
        f = pair()
        walls.append(cuda_ms(f, 2))
    res: dict = {"wall_ms_median": statistics.median(walls[1:]), "walls_ms": walls}
    f = pair()
    with profile(activities=activities(a.device)) as prof:
        f()
        sync()
    res["profiled"] = gpu_timeline(prof, gap_us=30.0)
    res["top_kernels"] = top_kernels(prof, 12)
    f = pair()
    pr = cProfile.Profile()
    pr.enable()
    f()
    sync()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(30)
    res["cprofile"] = buf.getvalue().splitlines()[-45:]
    print("\n".join(res["cprofile"]))
    return res


class GCPauses:
    """The garbage collector's pauses over 1 ms while `on`, as (ms, generation)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int]] = []
        self._t, self.on = 0.0, False
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self.on and (ms := (time.perf_counter() - self._t) * 1000) > 1.0:
            self.pauses.append((round(ms, 2), info["generation"]))


def triton_variants() -> dict[str, int]:
    """Compiled variants per Triton kernel of phi3v's modules that hold `@triton.jit` functions."""
    out = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("phi3v."):
            continue
        for attr, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if isinstance(caches, dict):
                try:
                    out[f"{name}.{attr}"] = sum(len(c[0]) for c in caches.values())
                except (TypeError, IndexError, KeyError):
                    out[f"{name}.{attr}"] = 0
    return out


def _offline_run(llm: LLM, jobs: list, gcp: GCPauses) -> tuple[float, dict]:
    before = triton_variants()
    gcp.pauses, gcp.on = [], True
    t = time.perf_counter()
    llm.generate_many(jobs)
    sync()
    wall = time.perf_counter() - t
    gcp.on = False
    new = {k: v - before.get(k, 0) for k, v in triton_variants().items() if v > before.get(k, 0)}
    return wall, {"triton_variants_compiled": new, "gc_pauses_ms_gen": sorted(gcp.pauses, reverse=True)[:10],
                  "gc_ms": round(sum(p for p, _ in gcp.pauses), 2)}


def mode_offline(llm: LLM, a: argparse.Namespace) -> dict:
    res: dict = {"n": a.n, "tokens": a.tokens}
    gcp, cuda = GCPauses(), a.device == "cuda"
    for nc in a.crops:
        job = functools.partial(offline_request, llm, nc=nc)
        llm.generate_many([functools.partial(job, a.n + i, 2) for i in range(a.n)])  # warm-up, as the bench's
        sync()
        before = torch.cuda.memory_stats() if cuda else {}
        with profile(activities=activities(a.device)) as prof:
            wall, first = _offline_run(llm, [functools.partial(job, i, a.tokens) for i in range(a.n)], gcp)
        after = torch.cuda.memory_stats() if cuda else {}
        plain, second = _offline_run(llm, [functools.partial(job, 3 * a.n + i, a.tokens) for i in range(a.n)], gcp)
        res[f"nc{nc}"] = {"profiled_wall_s": wall, **first, **gpu_timeline(prof),
                          "allocator_calls": {k: after.get(k, 0) - before.get(k, 0) for k in ALLOC},
                          "second_run": {"unprofiled_wall_s": plain, **second}}
        print(nc, res[f"nc{nc}"], flush=True)
    return res


MODES = {"decode": mode_decode, "prefill": mode_prefill, "ttft": mode_ttft, "offline": mode_offline,
         "followup": mode_followup}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=list(MODES))
    ap.add_argument("--folder", default="/tmp/phi3v-full-random", help="checkpoint (written when missing)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--crops", type=int, nargs="+", default=[16, 4], help="num_crops (prefill, ttft, offline)")
    ap.add_argument("--n", type=int, default=None, help="requests: prefill 32, offline 64")
    ap.add_argument("--tokens", type=int, default=200, help="offline: new tokens per image")
    ap.add_argument("--steps", type=int, default=100, help="decode: timed engine steps")
    ap.add_argument("--reps", type=int, default=6, help="ttft: calls per median (the first is a warm-up)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="decode: the request names a per-request LoRA adapter of this rank on every decoder layer's "
                         "qkv, o, gate_up and down (benchmarks/lora_bench.py's), 0: none")
    a = ap.parse_args(argv)
    a.n = a.n or (32 if a.mode == "prefill" else 64)
    return a


@torch.inference_mode()
def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if not (Path(a.folder) / "config.json").exists():
        write_random_checkpoint(str(DATA / "real-configs" / "phi-3-vision-128k-instruct"), str(DATA / "tiny-phi3v"),
                                a.folder)
    missing = label_phases() if a.mode in ("ttft", "offline", "followup") else []
    a.lora, loras = None, None
    if a.lora_rank:
        from benchmarks.lora_bench import write_adapters
        a.lora, loras = "a0", write_adapters(Phi3VConfig.from_pretrained(a.folder), tempfile.mkdtemp(), 1, a.lora_rank)
    llm = LLM(a.folder, device=a.device, max_num_seqs=64 if a.mode in ("prefill", "offline") else 4,
              max_model_len=3072, loras=loras)
    llm.warmup()  # as the bench, the server and the batch job do
    res = {"mode": a.mode, "device": torch.cuda.get_device_name(0) if a.device == "cuda" else a.device,
           "date": time.strftime("%Y-%m-%d"), "phases_missing": missing, **MODES[a.mode](llm, a)}
    emit(res, a.out)
    return res


if __name__ == "__main__":
    main()
