"""Where a batch-1 decode step's time goes (GPU): graph replay alone vs engine step vs API loop,
fused Triton kernels on and off, plus the top CUDA kernels of one eager step.

Usage: python benchmarks/decode_profile.py --folder /tmp/phi3v-full-random [--out profile.json]
(the folder is made by `phi3v bench --random ...`; it is written here if missing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v.bench import PROMPT, emit, noise_image, write_random_checkpoint  # noqa: E402
from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.engine.paged_attention import num_splits  # noqa: E402

DATA = ROOT / "tests" / "data"


def ensure_checkpoint(folder: str) -> None:
    if not os.path.exists(os.path.join(folder, "config.json")):
        write_random_checkpoint(str(DATA / "real-configs" / "phi-3-vision-128k-instruct"), str(DATA / "tiny-phi3v"), folder)


def checkpoint_args() -> argparse.Namespace:
    """--folder (a full-size random checkpoint, written there when missing) and --out (JSON), as the
    single-request benchmark scripts take them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/phi3v-full-random")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ensure_checkpoint(a.folder)
    return a


def cuda_ms(fn, n: int) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


@torch.inference_mode()
def main() -> None:
    a = checkpoint_args()
    llm = LLM(a.folder, device="cuda", max_num_seqs=4, max_model_len=3072)
    eng, model = llm.engine, llm.model
    res: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d")}
    img = noise_image(1344, 1344, 0)
    gen_tokens = {}
    for fused in (False, True):
        model.model.fused = fused
        eng.runner.reset()
        r: dict = {}
        req = llm.prepare(PROMPT, [img], SamplingParams(max_tokens=2000, ignore_eos=True), 16)
        rid = eng.add_request(req.prompt_ids, req.images, req.params)
        eng.step()  # prefill
        for _ in range(3):
            eng.step()
        seq = eng.sched.get(rid)
        n_tok = seq.num_tokens
        dev = torch.tensor([[seq.output_ids[-1]], [n_tok - 1], [0]], device="cuda")
        bt = eng._block_table([seq])
        nsplit = num_splits(1, llm.config.num_key_value_heads)
        r["graph_replay_ms"] = cuda_ms(lambda: eng.runner.decode(dev[0], dev[1], dev[2].bool(), bt, n_tok), 100)
        r["eager_forward_ms"] = cuda_ms(lambda: eng.runner._forward(dev[0], dev[1], dev[2].bool(), bt, n_tok, nsplit), 20)
        t = time.perf_counter()
        for _ in range(100):
            eng.step()
        r["engine_step_ms"] = (time.perf_counter() - t) * 10
        if fused:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                eng.runner._forward(dev[0], dev[1], dev[2].bool(), bt, n_tok, nsplit)
                torch.cuda.synchronize()
            rows = []
            for ev in prof.key_averages():
                if ev.device_time_total > 0:
                    rows.append((ev.key[:60], ev.count, ev.device_time_total / 1000))
            rows.sort(key=lambda x: -x[2])
            r["eager_kernels_top"] = rows[:15]
            r["eager_kernel_count"] = sum(x[1] for x in rows)
            r["eager_kernel_ms_total"] = sum(x[2] for x in rows)
        eng.abort(rid)
        c = llm.generate(PROMPT, [img], SamplingParams(max_tokens=256, ignore_eos=True), num_crops=16)
        r["api_decode_tok_s"] = c.timings["decode_tokens_per_s"]
        gen_tokens[fused] = c.token_ids
        res["fused" if fused else "unfused"] = r
    res["fused_vs_unfused_same_tokens"] = sum(x == y for x, y in zip(gen_tokens[True], gen_tokens[False]))
    emit(res, a.out)


if __name__ == "__main__":
    main()
