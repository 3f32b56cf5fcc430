"""Where the offline benchmark's prefill steps spend their time (GPU): one engine step that admits
N prepared requests (images of the bench's mixed sizes), under the torch profiler, after a warm-up
step of the same shapes. Prints wall time, summed CUDA kernel time, and the top kernels.

Usage: python benchmarks/prefill_profile.py [--folder /tmp/phi3v-full-random] [--n 32] [--out prefill.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import MIXED_SIZES, PROMPT, emit, noise_image  # noqa: E402


def admit_and_prefill(llm: LLM, reqs: list) -> float:
    eng = llm.engine
    rids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs]
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.step()  # admits and prefills them all
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    for rid in rids:
        eng.abort(rid)
    eng.step()
    return dt


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/phi3v-full-random")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    llm = LLM(a.folder, device="cuda", max_num_seqs=64, max_model_len=3072)
    res: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "n": a.n}
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    for nc in (16, 4):
        warm = [llm.prepare(PROMPT, [noise_image(*MIXED_SIZES[i % 8], 7000 + i)], p, nc) for i in range(a.n)]
        reqs = [llm.prepare(PROMPT, [noise_image(*MIXED_SIZES[i % 8], 8000 + i)], p, nc) for i in range(a.n)]
        admit_and_prefill(llm, warm)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            wall = admit_and_prefill(llm, reqs)
        rows = [(ev.key[:70], ev.count, ev.self_device_time_total / 1000) for ev in prof.key_averages()
                if ev.self_device_time_total > 0]  # kernels (ops have no self device time)
        rows.sort(key=lambda x: -x[2])
        cuda_ms = sum(x[2] for x in rows)
        res[f"nc{nc}"] = {"wall_ms": 1000 * wall, "wall_ms_per_image": 1000 * wall / a.n,
                          "cuda_kernel_ms": cuda_ms, "cuda_kernel_ms_per_image": cuda_ms / a.n,
                          "tokens_per_image": sum(len(r.prompt_ids) for r in reqs) / a.n,
                          "top_kernels": rows[:25],
                          "top_cpu_ops": [(ev.key[:60], ev.count, ev.cpu_time_total / 1000) for ev in
                                          sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]}
    emit(res, a.out)


if __name__ == "__main__":
    main()
