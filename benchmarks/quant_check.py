"""FP8 / int4 decoder weights against bf16 on the GPU (issue 20): error, speed and memory, one mode after another.

For each mode (bf16, fp8, int4, and fp8_dot / int4_dot: the same weights with the decode GEMVs on tensor cores,
`QuantSpec.decode_dot`, fp8_dot being W8A8; `--kv-cache-dtype fp8` combines them with the fp8 KV cache):
- per-layer relative error of the quantized linear vs the checkpoint's bf16 weight in fp32 (random N(0,1)
  activations; 1 row = the decode GEMV, 512 rows = the prefill GEMM), max and mean per kind (qkv, o, gate_up,
  down, lm_head); bf16's own row is F.linear in bf16 (its rounding, the floor);
- last-token logit cosine vs bf16 on the (a) prompt (one 16-crop image, 2.5k tokens), plain causal attention
  (a prefill forward: fp8's numerics there are W8A8, x quantized per token, which are also fp8_dot's decode
  numerics; plain fp8 decodes weight-only, so its decode is slightly closer to bf16 than this cosine says);
- greedy agreement over `--tokens` tokens: the prefix that matches bf16's greedy output through the engine
  (decode steps: the mode's own decode GEMVs),
  and the teacher-forced agreement (this mode's argmax on bf16's tokens, position by position);
- batch-1 decode tok/s with the 16-crop image (phi3v bench (a)), prefill GEMM TFLOP/s and decode GEMV GB/s
  per shape (CUDA events), weights GiB, peak memory, and how many 16-crop sequences the KV cache would hold
  (phi3v.bench.kv_capacity, at --gpu-memory-utilization).
Random weights have no outlier channels: the errors here are a floor for real checkpoints (README).

Usage (GPU): python benchmarks/quant_check.py [--model /tmp/phi3v-full-random] [--modes bf16,fp8,fp8_dot,...]
             [--kv-cache-dtype fp8] [--out $OUT/quant_check.json]
  The checkpoint is written (full-size random weights) when --model has no config.json.
  CPU smoke run of the plumbing: --model tests/data/tiny-phi3v --device cpu --tokens 16
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import PROMPT, _decode, emit, kv_capacity, noise_image, write_random_checkpoint  # noqa: E402
from phi3v.models.phi3 import proj  # noqa: E402
from phi3v.models.quant import (FP8Linear, Int4Linear, QuantLinear, QuantSpec, dequantize_int4,  # noqa: E402
                                fp8_linear_reference)
from phi3v.models.weights import checkpoint_files  # noqa: E402

KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _bf16_weights(folder: str, names: list[str]) -> dict[str, torch.Tensor]:
    want = {f"{n}.weight" for n in names}
    out = {}
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as f:
            out.update({k[: -len(".weight")]: f.get_tensor(k) for k in f.keys() if k in want})
    return out


def layer_errors(llm: LLM, folder: str) -> dict[str, dict[str, float]]:
    """{kind: {decode_max, decode_mean, prefill_max, prefill_mean}} over the layers of that kind."""
    model, dev = llm.model, llm.device
    names = [n for n, m in model.named_modules() if n.endswith(KINDS) and isinstance(m, (QuantLinear, torch.nn.Linear))
             and "vision" not in n]
    ref = _bf16_weights(folder, names)
    g = torch.Generator(device=dev).manual_seed(0)
    acc: dict[str, dict[str, list[float]]] = {}
    for name in names:
        mod, w = model.get_submodule(name), ref[name].to(dev)
        for phase, rows in (("decode", 1), ("prefill", 512)):
            x = torch.randn(rows, w.shape[1], device=dev, generator=g).to(llm.dtype)
            y_ref = x.float() @ w.float().T
            y = proj(mod, x, mod_fused(model)).float()  # bf16: the engine's own kernels, as the others
            err = float((y - y_ref).norm() / y_ref.norm())
            acc.setdefault(name.rpartition(".")[2], {}).setdefault(phase, []).append(err)
    return {k: {f"{p}_{s}": (max(v) if s == "max" else sum(v) / len(v)) for p, v in d.items() for s in ("max", "mean")}
            for k, d in acc.items()}


@torch.no_grad()
def kernel_check(llm: LLM) -> dict[str, float]:
    """The quantized kernels (GEMV, GEMM, _scaled_mm with the Triton activation quantizer) against the plain-torch
    math of the same quantized weights, layer 0's shapes plus lm_head: {kind/rows: relative error}. Kernel bugs
    show here; quantization error does not (it is in both)."""
    out: dict[str, float] = {}
    dev = llm.device
    mods = {n.rpartition(".")[2]: m for n, m in llm.model.named_modules()
            if (n.startswith("model.layers.0.") or n == "lm_head") and isinstance(m, QuantLinear)}
    for kind, mod in mods.items():
        for rows in (1, 3, 8, 64, 2560):
            x = torch.randn(rows, mod.in_features, device=dev, dtype=llm.dtype)
            y = mod.project(x, mod_fused(llm.model), False).float()
            if isinstance(mod, FP8Linear):  # decode_dot: W8A8 at every row count
                ref = fp8_linear_reference(x, mod.weight, mod.weight_scale, per_token=rows > 8 or mod.decode_dot)
            else:
                assert isinstance(mod, Int4Linear)
                ref = x.float() @ dequantize_int4(mod.qweight, mod.scales, mod.mins).T
            out[f"{kind}/{rows}"] = float((y - ref).norm() / ref.norm())
    return out


def mod_fused(model: torch.nn.Module) -> bool:
    return bool(model.model.layers[0].self_attn.fused)


def prompt_inputs(llm: LLM, tokens: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Embeddings (1, T, hidden) of the (a) prompt (+ `tokens` appended) and the prompt's length."""
    req = llm.prepare(PROMPT, [noise_image(1344, 1344, 0)], SamplingParams(), num_crops=16)
    feats = llm.model.encode_images([i.pixels() for i in req.images], [i.image_size for i in req.images])
    ids = torch.tensor(req.prompt_ids + list(tokens or []))
    return llm.model.embed(ids, feats)[None], len(req.prompt_ids)


@torch.no_grad()
def logits_over(llm: LLM, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last prompt token's logits (vocab,), argmax at each generated position (len(tokens),)), fp32 on the CPU."""
    x, n = prompt_inputs(llm, tokens)
    t = x.shape[1]
    long_rope = torch.tensor([t > llm.config.original_max_position_embeddings], device=llm.device)
    h = llm.model(x, torch.arange(t, device=llm.device)[None], long_rope)[0]  # (T, hidden), causal SDPA
    logits = llm.model.logits(h[n - 1: t - 1])  # predictions of the generated tokens
    return logits[0].cpu(), logits.argmax(-1).cpu()


def time_cycle(fns: list, reps: int = 20) -> float:
    """Seconds per call of the callables `fns`, called in turn (CUDA events, after 3 warm-up rounds; the host
    clock without CUDA: smoke runs only)."""
    for _ in range(3):
        for f in fns:
            f()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for _ in range(reps):
            for f in fns:
                f()
        return (time.perf_counter() - t) / (reps * len(fns))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for f in fns:
            f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / (reps * len(fns))


def weight_copies(mod: torch.nn.Module, past_l2: int = 256 << 20) -> list[torch.nn.Module]:
    """Enough copies of `mod` that cycling through them reads weights from HBM, not from L2 (H200: 50 MB)."""
    nbytes = sum(p.numel() * p.element_size() for p in mod.parameters())
    return [mod] + [copy.deepcopy(mod) for _ in range(min(63, past_l2 // nbytes))]


def gemm_speed(llm: LLM) -> dict[str, dict[str, float]]:
    """Prefill GEMM TFLOP/s (2,560 rows: a 16-crop prompt) and decode GEMV weight GB/s (1 row, cycling over weight
    copies past L2), layer 0's shapes and lm_head."""
    dev, out = llm.device, {}
    if dev.type != "cuda":
        return out
    mods = {n.rpartition(".")[2]: m for n, m in llm.model.named_modules() if n.startswith("model.layers.0.")
            and n.endswith(KINDS)}
    mods["lm_head"] = llm.model.lm_head
    fused = mod_fused(llm.model)
    for kind, mod in mods.items():
        nbytes = sum(p.numel() * p.element_size() for p in mod.parameters())
        x = torch.randn(2560, mod.in_features, device=dev, dtype=llm.dtype)
        s = time_cycle([lambda: proj(mod, x, fused)])
        res = {"prefill_us": s * 1e6, "prefill_tflops": 2 * x.numel() * mod.out_features / s / 1e12}
        x1 = x[:1]
        s = time_cycle([functools.partial(proj, m, x1, fused) for m in weight_copies(mod)])
        res.update(decode_us=s * 1e6, decode_weight_gb_s=nbytes / s / 1e9)
        out[kind] = res
    return out


def run_mode(a: argparse.Namespace, mode: str, ref: dict) -> dict:
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    method, _, dot = mode.partition("_")  # fp8_dot / int4_dot: the decode GEMVs on tensor cores
    quant = None if mode == "bf16" else QuantSpec(method, lm_head=a.quantize_lm_head, decode_dot=dot == "dot")
    llm = LLM(a.model, device=dev, dtype="bf16", quantization=quant, max_num_seqs=2, max_model_len=a.max_model_len,
              kv_cache_dtype=a.kv_cache_dtype, kv_budget_bytes=a.kv_budget_gib << 30)
    res: dict = {"mode": mode, "load_s": time.perf_counter() - t0,
                 "weights_gib": sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**30}
    if dev.type == "cuda":
        c = llm.engine.cache
        free = torch.cuda.mem_get_info(dev)[0] + 2 * c.k.numel() * c.k.element_size()
        res.update(kv_capacity(llm, free, a.gpu_memory_utilization, 200))
        res["mem_after_load_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["layer_errors"] = layer_errors(llm, a.model)
    if mode != "bf16":
        res["kernel_vs_torch"] = kernel_check(llm)
        res["kernels_ok"] = all(e < 2e-2 for e in res["kernel_vs_torch"].values())  # bf16 output rounding
    greedy = llm.generate(PROMPT, [noise_image(1344, 1344, 0)], SamplingParams(max_tokens=a.tokens, ignore_eos=True),
                          num_crops=16).token_ids
    if mode == "bf16":
        ref["tokens"] = greedy
    last, argmax = logits_over(llm, ref["tokens"])
    if mode == "bf16":
        ref["logits"] = last
    match = next((i for i, (p, q) in enumerate(zip(greedy, ref["tokens"])) if p != q), len(greedy))
    res.update(logit_cosine=float(F.cosine_similarity(last, ref["logits"], dim=0)), greedy_prefix_match=match,
               greedy_tokens=len(greedy),
               teacher_forced_agreement=float((argmax == torch.tensor(ref["tokens"])).float().mean()))
    res["gemm"] = gemm_speed(llm)
    if dev.type == "cuda" or a.decode_on_cpu:
        llm.warmup()
        _decode(llm, res, a.tokens)
    if dev.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del llm
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def table(results: list[dict]) -> str:
    cols = ("mode", "weights_gib", "a_decode_tok_s", "logit_cosine", "greedy_prefix_match", "teacher_forced_agreement",
            "d_concurrent_16crop_seqs", "peak_mem_gib")
    lines = [" | ".join(cols)]
    for r in results:
        lines.append(" | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    for r in results:
        errs = ", ".join(f"{k} {v['decode_max']:.4f}/{v['prefill_max']:.4f}" for k, v in r["layer_errors"].items())
        lines.append(f"{r['mode']} max layer rel. error decode/prefill: {errs}")
        if r["gemm"]:
            lines.append(f"{r['mode']} prefill TFLOP/s | decode GB/s: " + ", ".join(
                f"{k} {v['prefill_tflops']:.0f} | {v['decode_weight_gb_s']:.0f}" for k, v in r["gemm"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/phi3v-full-random")
    ap.add_argument("--config-dir", default=str(ROOT / "tests/data/real-configs/phi-3-vision-128k-instruct"))
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/data/tiny-phi3v"))
    ap.add_argument("--modes", default="bf16,fp8,fp8_dot,int4,int4_dot",
                    help="_dot: QuantSpec.decode_dot (fp8_dot = W8A8 decode GEMVs, int4_dot = int4 on tensor cores)")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--quantize-lm-head", action="store_true")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=3072)
    ap.add_argument("--kv-budget-gib", type=int, default=6, help="the KV cache of each mode's engine here")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="for the capacity figure")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode-on-cpu", action="store_true", help="run the decode timing on the CPU too (slow)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "quant_check.json"))
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.model, "config.json")):
        write_random_checkpoint(a.config_dir, a.tokenizer, a.model)
    modes = a.modes.split(",")
    if modes[0] != "bf16":
        raise SystemExit("--modes must start with bf16 (the reference of the others)")
    ref: dict = {}
    results = []
    for mode in modes:
        results.append(run_mode(a, mode, ref))
        print(table(results[-1:]), flush=True)
    print(table(results))
    bad = [f"{r['mode']} {k}: {e:.3g}" for r in results for k, e in r.get("kernel_vs_torch", {}).items() if e >= 2e-2]
    print("kernels vs torch: " + ("ok" if not bad else "MISMATCH " + "; ".join(bad)))
    emit({"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu", "torch": torch.__version__,
          "kv_cache_dtype": a.kv_cache_dtype, "quantize_lm_head": a.quantize_lm_head, "tokens": a.tokens,
          "results": results}, a.out)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
