"""Decode and prefill tokens/s on the CPU against the number of PyTorch threads, for decoders of several widths.

The data behind the CPU thread rule of `phi3v.device.default_cpu_threads` (docs/perf-log.md). Each width is a
random-weight checkpoint with Phi-3.5-vision's decoder layout (head_dim 96, LongRoPE, vocabulary 32064) cut to
--layers layers and the tiny test checkpoint's vision tower (decoding never runs it); `tiny` is
tests/data/tiny-phi3v itself (hidden 64, 2 layers). Per-layer work is that of the real width, so the thread
scaling of a full-size model shows in the 3072-wide one; tokens/s scale with 32 / layers for the real depth.

    python benchmarks/cpu_threads.py --widths tiny,384,768,1536,3072 --threads 1,2 --layers 4 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "tiny-phi3v")
REAL = os.path.join(ROOT, "tests", "data", "real-configs", "phi-3.5-vision-instruct")


def checkpoint(width: int, layers: int, out: str) -> str:
    """A random checkpoint `width` wide and `layers` deep in `out` (kept for later runs)."""
    from phi3v.config import Phi3VConfig
    from phi3v.models.weights import random_checkpoint

    if os.path.exists(os.path.join(out, "config.json")):
        return out
    with open(os.path.join(REAL, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    with open(os.path.join(TINY, "config.json"), encoding="utf-8") as f:
        cfg["img_processor"] = json.load(f)["img_processor"]
    heads = width // 96
    cfg.update(hidden_size=width, intermediate_size=8 * width // 3 // 64 * 64, num_attention_heads=heads,
               num_key_value_heads=heads, num_hidden_layers=layers)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    for fn in os.listdir(TINY):
        if fn != "config.json" and not fn.endswith(".safetensors"):
            shutil.copyfile(os.path.join(TINY, fn), os.path.join(out, fn))
    random_checkpoint(Phi3VConfig.from_pretrained(out), out + ".tmp")
    for fn in os.listdir(out + ".tmp"):
        if fn.endswith(".safetensors") or fn.endswith(".index.json"):
            shutil.move(os.path.join(out + ".tmp", fn), os.path.join(out, fn))
    shutil.rmtree(out + ".tmp")
    return out


def decode_tok_s(llm, threads: list[int], tokens: int, reps: int) -> dict[int, float]:
    """Decode tokens/s of one request (the first token excluded, text prompt) per thread count: the best of
    `reps` runs, the counts interleaved run by run (on a shared machine the best run is the one least disturbed)."""
    from phi3v import SamplingParams

    p = SamplingParams(max_tokens=tokens, ignore_eos=True)
    prompt = "<|user|>\nTell me about the sea.<|end|>\n<|assistant|>\n"
    best = {t: 0.0 for t in threads}
    for t in threads:  # warm
        torch.set_num_threads(t)
        llm.generate(prompt, p)
    for _ in range(reps):
        for t in threads:
            torch.set_num_threads(t)
            c = llm.generate(prompt, p)
            rate = (c.usage["completion_tokens"] - 1) / (c.timings["total_s"] - c.timings["ttft_s"])
            best[t] = max(best[t], rate)
    return best


def prefill_tok_s(llm, threads: list[int], tokens: int, reps: int) -> dict[int, float]:
    """Prompt tokens/s of a `tokens`-token text prompt (time to its first token; the prefix cache is off), best of
    `reps`, the thread counts interleaved."""
    from phi3v import SamplingParams

    prompt = "<|user|>\n" + "sea " * (tokens - 8) + "<|end|>\n<|assistant|>\n"
    best = {t: 0.0 for t in threads}
    for rep in range(reps + 1):
        for t in threads:
            torch.set_num_threads(t)
            c = llm.generate(prompt, SamplingParams(max_tokens=1))
            if rep:  # the first round warms
                best[t] = max(best[t], c.usage["prompt_tokens"] / c.timings["ttft_s"])
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="tiny,384,768,1536,3072")
    ap.add_argument("--threads", default=None, help="comma-separated (default: 1 .. os.cpu_count())")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt tokens of the prefill runs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/phi3v-cpu-threads")
    a = ap.parse_args()
    from phi3v import LLM

    threads = [int(t) for t in a.threads.split(",")] if a.threads else list(range(1, (os.cpu_count() or 1) + 1))
    rows = []
    for w in a.widths.split(","):
        path = TINY if w == "tiny" else checkpoint(int(w), a.layers, os.path.join(a.dir, f"w{w}-l{a.layers}"))
        llm = LLM(path, device="cpu", dtype="fp32", max_model_len=1024, max_num_seqs=1, cpu_threads=threads[0],
                  enable_prefix_caching=False)
        dec = decode_tok_s(llm, threads, a.tokens, a.reps)
        pre = prefill_tok_s(llm, threads, a.prompt_tokens, a.reps)
        for t in threads:
            rows.append({"width": w, "layers": llm.config.num_hidden_layers, "threads": t,
                         "decode_tok_s": round(dec[t], 1), "prefill_tok_s": round(pre[t], 1)})
            print(json.dumps(rows[-1]), flush=True)
        del llm
    json.dump(rows, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
