"""GPU check + first numbers (run on the lent H100):

1. the tiny golden checkpoint on CUDA fp32 gives the reference's greedy tokens (all cases);
2. a full-size checkpoint of random bf16 weights with the real Phi-3-vision config is written in
   the HF layout, loaded through `phi3v.LLM`, and generates;
3. batch-1 decode tokens/s with one 16-crop image in context (256 tokens, eos ignored), time to
   first token (preprocessing included) at 16 and 4 crops, an offline batch, and peak memory.

Usage: python benchmarks/gpu_smoke.py [--out results.json] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.config import Phi3VConfig  # noqa: E402
from phi3v.models.weights import random_checkpoint  # noqa: E402

DATA = ROOT / "tests" / "data"
PROMPT = "<|user|>\n<|image_1|>\nDescribe the image in detail.<|end|>\n<|assistant|>\n"


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def tiny_parity() -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gold = DATA / "golden"
    man = json.loads((gold / "manifest.json").read_text())
    llm = LLM(str(DATA / "tiny-phi3v"), device="cuda", dtype="fp32", max_model_len=4096)
    res = {}
    for key, case in man["model"].items():
        if case.get("status") != "ok" or not case.get("file"):
            continue
        if key.endswith("/phi3v") and key.replace("/phi3v", "/phi35v") in man["model"]:
            continue  # crossing cases: phi3v follows the Phi-3.5 fix
        z = np.load(gold / case["file"])
        imgs = [str(next(p for p in (gold / "images").iterdir() if p.stem == n)) for n in case.get("images") or []]
        c = llm.generate(case["prompt"], imgs, SamplingParams(max_tokens=32, ignore_eos=True, logprobs=1),
                         num_crops=case.get("num_crops"))
        ref = torch.log_softmax(torch.from_numpy(z["last_logits"]).double(), -1)
        res[key] = {"greedy_match": c.token_ids == z["gen_ids"].tolist(),
                    "n_match": sum(a == b for a, b in zip(c.token_ids, z["gen_ids"].tolist())),
                    "step0_logprob_abs_diff": abs(c.logprobs[0]["logprob"] - float(ref[c.token_ids[0]]))}
    del llm
    torch.cuda.empty_cache()
    return res


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def full_size(folder: str) -> dict:
    res: dict = {}
    cfg = Phi3VConfig.from_pretrained(str(DATA / "real-configs" / "phi-3-vision-128k-instruct"))
    t = time.perf_counter()
    random_checkpoint(cfg, folder, device="cuda", seed=0)
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(DATA / "tiny-phi3v" / fn, os.path.join(folder, fn))
    res["write_checkpoint_s"] = time.perf_counter() - t
    res["checkpoint_files"] = sorted(os.listdir(folder))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    llm = LLM(folder, device="cuda", max_num_seqs=48, max_model_len=3072)
    torch.cuda.synchronize()
    res["load_s"] = time.perf_counter() - t
    res["weights_gib"] = sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**30
    res["kv_slots"] = llm.engine.sched.max_num_seqs
    res["mem_after_load_gib"] = torch.cuda.memory_allocated() / 2**30

    img16 = noise_image(1344, 1344, 0)
    # warm up: graphs for the widths used below
    llm.generate(PROMPT, [img16], SamplingParams(max_tokens=300, ignore_eos=True), num_crops=16)
    dec = []
    for _ in range(3):
        c = llm.generate(PROMPT, [img16], SamplingParams(max_tokens=256, ignore_eos=True), num_crops=16)
        dec.append(c.timings["decode_tokens_per_s"])
    res["a_decode_tok_s_16crop_batch1"] = statistics.median(dec)
    res["a_prompt_tokens"] = c.usage["prompt_tokens"]
    res["sample_text_prefix"] = c.text[:80]

    for nc, size in ((16, (1344, 1344)), (4, (672, 672))):
        ttft = []
        for s in range(6):  # a new image each time: no image-embedding cache hit
            img = noise_image(*size, 100 + s)
            t = time.perf_counter()
            llm.generate(PROMPT, [img], SamplingParams(max_tokens=1), num_crops=nc)
            torch.cuda.synchronize()
            ttft.append(time.perf_counter() - t)
        res[f"b_ttft_ms_{nc}crop"] = 1000 * statistics.median(ttft[1:])

    for nc in (16, 4):
        sizes = [(1344, 1344), (1600, 900), (900, 1600), (800, 600), (2000, 500), (640, 640), (1024, 768), (500, 2000)]
        reqs = [llm.prepare(PROMPT, [noise_image(*sizes[i % len(sizes)], 1000 + i)],
                            SamplingParams(max_tokens=200, ignore_eos=True), nc) for i in range(64)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate_many(reqs)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        res[f"c_offline_{nc}crop_images_per_s"] = 64 / dt
        res[f"c_offline_{nc}crop_gen_tokens_per_s"] = sum(len(o.token_ids) for o in outs) / dt
    res["d_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--folder", default="/tmp/phi3v-full-random")
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "tiny_cuda_fp32": tiny_parity()}
    print(json.dumps(res["tiny_cuda_fp32"], indent=1), flush=True)
    if not a.skip_full:
        res["full_size_bf16"] = full_size(a.folder)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
