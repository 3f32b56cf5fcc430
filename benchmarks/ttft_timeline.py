"""Where the wall time of one `llm.generate(max_tokens=1)` goes: host phases against GPU busy time.

`ttft_breakdown.py` times each phase alone; this script times the real call once under the torch
profiler and lines up the host's phases (labels below) with the kernels: when the GPU starts, how
long it is busy, and every idle gap on the GPU with the host phase that was running during it.

Usage: python benchmarks/ttft_timeline.py [--folder /tmp/phi3v-full-random] [--out timeline.json]
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams, api  # noqa: E402
from phi3v.bench import PROMPT, emit, noise_image  # noqa: E402
from phi3v.engine import engine as engine_mod, images as images_mod, prefill as prefill_mod  # noqa: E402
from phi3v.processing import image as image_mod  # noqa: E402
from decode_profile import checkpoint_args  # noqa: E402  (benchmarks/ is the script's folder)

# (owner, attribute) of every host phase that gets a label
PHASES = [(api.LLM, "prepare"), (image_mod.ImageProcessor, "preprocess"), (image_mod, "hd_resized"),
          (image_mod, "pad_canvas"), (image_mod.ImageProcessor, "normalize"), (api, "tokenize_prompt"), (engine_mod.Engine, "add_request"),
          (engine_mod.Engine, "_step"), (images_mod.ImageFeatures, "encode"), (engine_mod.Engine, "_prompt_embeds"),
          (prefill_mod.Prefiller, "prefill_many"), (engine_mod.Engine, "_sample_device"), (engine_mod.Engine, "_commit")]
LABELS = {f"phase:{a}" for _, a in PHASES}


def _label(owner: object, name: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(f"phase:{name}"):
            return fn(*args, **kwargs)

    setattr(owner, name, wrapped)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeline(prof: profile) -> dict:
    """Host phases and GPU activity in ms from the first host phase's start."""
    evs = prof.events()
    host = [e for e in evs if e.name in LABELS and e.device_type == DeviceType.CPU]
    kern = sorted((e for e in evs if e.device_type == DeviceType.CUDA and e.name not in LABELS),
                  key=lambda e: e.time_range.start)
    t0 = min(e.time_range.start for e in host)
    t1 = max(e.time_range.end for e in host)
    ms = lambda us: round((us - t0) / 1000, 3)  # noqa: E731
    phases = [{"phase": e.name[6:], "start_ms": ms(e.time_range.start), "end_ms": ms(e.time_range.end)}
              for e in sorted(host, key=lambda e: e.time_range.start)]
    out: dict = {"host_wall_ms": round((t1 - t0) / 1000, 3), "phases": phases, "kernels": len(kern)}
    if not kern:
        return out
    busy, gaps, end = 0.0, [], kern[0].time_range.start
    for k in kern:
        s, e = k.time_range.start, k.time_range.end
        if s > end + 50:  # an idle stretch of over 50 us
            during = [p["phase"] for p in phases if p["start_ms"] <= ms(end) <= p["end_ms"]]
            gaps.append({"from_ms": ms(end), "idle_ms": round((s - end) / 1000, 3), "host_in": during[-1:] or ["-"],
                         "next_kernel": k.name[:60]})
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    out.update(gpu_first_ms=ms(kern[0].time_range.start), gpu_last_ms=ms(end), gpu_busy_ms=round(busy / 1000, 3),
               gpu_idle_after_first_ms=round((end - kern[0].time_range.start - busy) / 1000, 3),
               gaps=sorted(gaps, key=lambda g: -g["idle_ms"])[:12])
    return out


@torch.inference_mode()
def main() -> None:
    a = checkpoint_args()
    for owner, name in PHASES:
        _label(owner, name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(a.folder, device=dev, max_num_seqs=4, max_model_len=3072)
    res: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}
    seed = iter(range(1000, 2000))
    for nc, size in ((16, (1344, 1344)), (4, (672, 672))):
        walls = []
        for _ in range(6):  # fresh images: no embedding-cache hits; the first is a warm-up
            img = noise_image(*size, next(seed))
            _sync()
            t = time.perf_counter()
            llm.generate(PROMPT, [img], SamplingParams(max_tokens=1), num_crops=nc)
            _sync()
            walls.append(1000 * (time.perf_counter() - t))
        img = noise_image(*size, next(seed))
        _sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])) as prof:
            llm.generate(PROMPT, [img], SamplingParams(max_tokens=1), num_crops=nc)
            _sync()
        res[f"nc{nc}"] = {"wall_ms_median": round(statistics.median(walls[1:]), 3), "walls_ms": [round(w, 2) for w in walls],
                          "profiled": timeline(prof)}
    emit(res, a.out)


if __name__ == "__main__":
    main()
