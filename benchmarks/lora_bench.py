"""What per-request LoRA adapters cost (issue 23): batch-1 decode tok/s and offline throughput of the base model, the
base with an adapter merged at load, one adapter per request, and four adapters mixed in one batch.

Modes (each a fresh LLM on the same checkpoint, run one after another; `base` is repeated last so that drift shows):
  base     no adapter
  merged   LLM(lora=PATH): merged into the weights at load (should equal base)
  lora1    LLM(loras={a0}): every request names a0
  lora4    LLM(loras={a0..a3}): decode names a0 (the stacks hold 4 x rank columns), the offline job cycles
           base, a0, a1, a2, a3 over its requests (rows of different adapters in every batch)
Measured per mode: (a) batch-1 decode tok/s with one 16-crop image in context (phi3v bench (a): 256 new tokens,
eos ignored, median of 3) and (c) offline images/s and tokens/s over `--n-offline` noise images of the 8 mixed sizes
at `--crops` crops x `--offline-tokens` tokens (preparation included, after an untimed warm-up of the same shapes).
`cost_vs_base`: 1 - mode / base for each number (the target: per-request adapters cost <= 15 % of decode).

Adapters: random, rank `--rank` (16) on every decoder layer's qkv_proj, o_proj, gate_up_proj, down_proj, in PEFT's
layout (speed does not depend on the values). Full-size checkpoint: written to --model first when it has no
config.json (full-size random weights, as phi3v bench --random).

Usage (GPU): python benchmarks/lora_bench.py [--model /tmp/phi3v-full-random] [--json-out $OUT/lora_bench.json]
CPU smoke run (tiny checkpoint, a few tokens): python benchmarks/lora_bench.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import MIXED_SIZES, PROMPT, emit, noise_image, write_random_checkpoint  # noqa: E402
from phi3v.config import Phi3VConfig  # noqa: E402

TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def write_adapters(cfg: Phi3VConfig, folder: str, n: int, rank: int) -> dict[str, str]:
    """n random PEFT adapters (a0..a{n-1}) of rank `rank` on every decoder layer's four linear layers."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = {"self_attn.qkv_proj": (qkv, h), "self_attn.o_proj": (h, cfg.num_attention_heads * cfg.head_dim),
              "mlp.gate_up_proj": (2 * i, h), "mlp.down_proj": (h, i)}
    out = {}
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        sd = {}
        for layer in range(cfg.num_hidden_layers):
            for t in TARGETS:
                o, d = shapes[t]
                key = f"base_model.model.model.layers.{layer}.{t}"
                sd[f"{key}.lora_A.weight"] = (torch.randn(rank, d, generator=g) / d**0.5).to(torch.bfloat16)
                sd[f"{key}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.01).to(torch.bfloat16)
        path = os.path.join(folder, f"a{k}")
        os.makedirs(path, exist_ok=True)
        save_file(sd, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": [t.split(".")[1] for t in TARGETS]}, f)
        out[f"a{k}"] = path
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _decode(llm: LLM, lora: str | None, tokens: int, crops: int) -> float:
    img = noise_image(1344, 1344, 0)
    llm.generate(PROMPT, [img], SamplingParams(max_tokens=tokens + 32, ignore_eos=True, lora=lora), num_crops=crops)
    rates = [llm.generate(PROMPT, [img], SamplingParams(max_tokens=tokens, ignore_eos=True, lora=lora),
                          num_crops=crops).timings["decode_tokens_per_s"] for _ in range(3)]
    return statistics.median(rates)


def _offline(llm: LLM, loras: list[str | None], n: int, tokens: int, crops: int) -> dict[str, float]:
    def req(i: int, max_tokens: int) -> Any:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, lora=loras[i % len(loras)])
        return llm.prepare(PROMPT, [noise_image(*MIXED_SIZES[i % len(MIXED_SIZES)], 1000 + i)], params, crops)

    llm.generate_many([lambda i=i: req(n + i, 2) for i in range(n)])  # warm-up: the same shapes, other images
    _sync()
    before = dict(llm.engine.stats)
    t = time.perf_counter()
    outs = llm.generate_many([lambda i=i: req(i, tokens) for i in range(n)])
    _sync()
    dt = time.perf_counter() - t
    st = {k: v - before.get(k, 0) for k, v in llm.engine.stats.items()}
    return {"c_images_per_s": n / dt, "c_tokens_per_s": sum(len(o.token_ids) for o in outs) / dt,
            "c_mean_decode_batch": st["decode_rows"] / max(1, st["decode_steps"]), "c_decode_s": st["decode_s"]}


def run_mode(a: argparse.Namespace, mode: str, adapters: dict[str, str]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    decode_lora: str | None = None
    offline_loras: list[str | None] = [None]
    if mode == "merged":
        kw["lora"] = adapters["a0"]
    elif mode == "lora1":
        kw["loras"] = {"a0": adapters["a0"]}
        decode_lora, offline_loras = "a0", ["a0"]
    elif mode == "lora4":
        kw["loras"] = {k: adapters[k] for k in ("a0", "a1", "a2", "a3")}
        decode_lora, offline_loras = "a0", [None, "a0", "a1", "a2", "a3"]
    elif mode != "base":
        raise SystemExit(f"unknown mode {mode!r}: base, merged, lora1, lora4")
    t = time.perf_counter()
    llm = LLM(a.model, device=a.device, dtype=a.dtype, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
              kv_budget_bytes=a.kv_budget_gib << 30 if a.device != "cpu" else None, **kw)
    res: dict[str, Any] = {"mode": mode, "load_s": time.perf_counter() - t}
    t = time.perf_counter()
    llm.warmup()
    res["warmup_s"] = time.perf_counter() - t
    res["a_decode_tok_s"] = _decode(llm, decode_lora, a.decode_tokens, a.decode_crops)
    res.update(_offline(llm, offline_loras, a.n_offline, a.offline_tokens, a.crops))
    if torch.cuda.is_available():
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/phi3v-full-random")
    ap.add_argument("--config-dir", default=str(ROOT / "tests/data/real-configs/phi-3-vision-128k-instruct"))
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/data/tiny-phi3v"))
    ap.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU, a few tokens (a smoke run)")
    ap.add_argument("--modes", default="base,merged,lora1,lora4,base")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=3072)
    ap.add_argument("--kv-budget-gib", type=int, default=40, help="each mode's KV cache (GPU)")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--decode-crops", type=int, default=16)
    ap.add_argument("--n-offline", type=int, default=64)
    ap.add_argument("--offline-tokens", type=int, default=200)
    ap.add_argument("--crops", type=int, default=4, help="offline job's crops per image")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    if a.tiny:
        a.model, a.device, a.rank = str(ROOT / "tests/data/tiny-phi3v"), "cpu", 4
        a.decode_tokens, a.decode_crops, a.n_offline, a.offline_tokens, a.crops = 16, 1, 10, 8, 1
        a.max_num_seqs = 8
    elif not os.path.exists(os.path.join(a.model, "config.json")):
        write_random_checkpoint(a.config_dir, a.tokenizer, a.model)
    cfg = Phi3VConfig.from_pretrained(a.model)
    with tempfile.TemporaryDirectory(prefix="phi3v-lora-") as tmp:
        adapters = write_adapters(cfg, tmp, 4, a.rank)
        results = [run_mode(a, m, adapters) for m in a.modes.split(",")]
    base = [r for r in results if r["mode"] == "base"]
    keys = ("a_decode_tok_s", "c_images_per_s", "c_tokens_per_s")
    ref = {k: statistics.mean(r[k] for r in base) for k in keys} if base else {}
    for r in results:
        if ref and r["mode"] != "base":
            r["cost_vs_base"] = {k: 1 - r[k] / ref[k] for k in keys}
    emit({"device": torch.cuda.get_device_name(0) if a.device != "cpu" else "cpu", "date": time.strftime("%Y-%m-%d"),
          "torch": torch.__version__, "rank": a.rank, "targets": list(TARGETS), "command": " ".join(sys.argv),
          "results": results}, a.json_out)


if __name__ == "__main__":
    main()
