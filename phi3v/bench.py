"""`phi3v bench`: the speed numbers of BENCHMARKS.md, measured through the public API.

(a) batch-1 decode tokens/s with one 16-crop image in context; (b) time to first token,
preprocessing included, at 16 and 4 crops (a new image each time: no embedding-cache hits);
(c) offline throughput over many images of mixed sizes; (d) peak GPU memory and how many 16-crop
sequences the KV cache could hold by the engine's sizing rule (more with fp8/int4 weights). Output length is
forced by ignoring eos. With `--random CONFIG_DIR` a full-size checkpoint of random weights is
written first (speed does not depend on weight values).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from PIL import Image


PROMPT = "<|user|>\n<|image_1|>\nDescribe the image in detail.<|end|>\n<|assistant|>\n"
MIXED_SIZES = [(1344, 1344), (1600, 900), (900, 1600), (800, 600), (2000, 500), (640, 640), (1024, 768), (500, 2000)]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_random_checkpoint(config_dir: str, tokenizer_dir: str, out: str, seed: int = 0) -> str:
    from phi3v.config import Phi3VConfig
    from phi3v.models.weights import random_checkpoint

    cfg = Phi3VConfig.from_pretrained(config_dir)
    if not os.path.exists(os.path.join(out, "config.json")):
        random_checkpoint(cfg, out, device="cuda" if torch.cuda.is_available() else "cpu", seed=seed)
    for fn in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, fn)
        if not os.path.exists(src):
            raise ValueError(f"--tokenizer folder {tokenizer_dir} has no {fn}")
        shutil.copyfile(src, os.path.join(out, fn))
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_bench(llm: Any, decode_tokens: int = 256, ttft_reps: int = 6, n_offline: int = 64,
              offline_tokens: int = 200, crops: tuple[int, ...] = (16, 4), parts: str = "abc",
              prep_workers: int | None = None, profile: bool = False) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if "a" in parts:
        _decode(llm, res, decode_tokens)
    if "b" in parts:
        _ttft(llm, res, crops, ttft_reps)
    if "c" in parts:
        _offline(llm, res, crops, n_offline, offline_tokens, prep_workers, profile)
    if "e" in parts:
        _follow_up(llm, res, ttft_reps)
    if "f" in parts:
        _long_prompts(llm, res)
    if torch.cuda.is_available():
        res["d_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _decode(llm: Any, res: dict[str, Any], decode_tokens: int) -> None:
    from phi3v import SamplingParams

    img16 = noise_image(1344, 1344, 0)
    llm.generate(PROMPT, [img16], SamplingParams(max_tokens=decode_tokens + 32, ignore_eos=True), num_crops=16)  # warm-up
    dec = []
    for _ in range(3):
        c = llm.generate(PROMPT, [img16], SamplingParams(max_tokens=decode_tokens, ignore_eos=True), num_crops=16)
        dec.append(c.timings["decode_tokens_per_s"])
    res["a_decode_tok_s"] = statistics.median(dec)
    res["a_prompt_tokens"] = c.usage["prompt_tokens"]


def _timed_first_token(llm: Any, prompt: str, img: Any, nc: int = 16) -> tuple[float, Any]:
    from phi3v import SamplingParams

    _sync()
    t = time.perf_counter()
    c = llm.generate(prompt, [img], SamplingParams(max_tokens=1), num_crops=nc)
    _sync()
    return time.perf_counter() - t, c


def _follow_up(llm: Any, res: dict[str, Any], reps: int) -> None:
    """(e) TTFT of a follow-up question about a 16-crop image already asked about, and of a second chat turn
    (turn 1: the image, a question and a 64-token answer): what the prefix cache serves."""
    from phi3v import SamplingParams

    q2 = "<|user|>\n<|image_1|>\nWhat is in the top left corner?<|end|>\n<|assistant|>\n"
    follow, turn2, cached, prep = [], [], [], []
    for s in range(reps + 1):
        img = noise_image(1344, 1344, 300 + s)
        ans = llm.generate(PROMPT, [img], SamplingParams(max_tokens=64, ignore_eos=True), num_crops=16)
        dt, c = _timed_first_token(llm, q2, img)
        follow.append(dt)
        prep.append(c.timings["preprocess_s"])  # the host's preparation (the image memo's part)
        dt, c = _timed_first_token(llm, PROMPT + ans.text + "<|end|>\n<|user|>\nAnd the colours?<|end|>\n"
                                   "<|assistant|>\n", img)
        turn2.append(dt)
        cached.append(c.usage["prompt_tokens_details"]["cached_tokens"] / c.usage["prompt_tokens"])
    res["e_follow_up_ttft_ms"] = 1000 * statistics.median(follow[1:])
    res["e_second_turn_ttft_ms"] = 1000 * statistics.median(turn2[1:])
    res["e_second_turn_cached_fraction"] = statistics.median(cached)
    res["e_follow_up_prepare_ms"] = 1000 * statistics.median(prep[1:])


def _long_prompts(llm: Any, res: dict[str, Any], lengths: tuple[int, ...] = (35_000, 107_000)) -> None:
    """(f) one 16-crop image + text to ~35k and ~107k tokens: TTFT (tokenization included) and decode tok/s.
    Needs --max-model-len above the longest."""
    from phi3v import SamplingParams

    # common English words, each one token with its leading space in Phi-3's tokenizer: n words ~ n tokens
    words = ("the of and to in is was for on are with as at be by this had not but from or have an they which one "
             "you were her all she there would their we him been has when who will more no if out so said what up "
             "its about into than them can only other new some could time these two may then do first any my now "
             "such like our over man me even most made after also did many before must through back years where "
             "much your way well down should because each just those people").split()
    for n in lengths:
        if n + 200 > llm.engine.max_model_len:
            continue
        rng = np.random.default_rng(n)
        text = " ".join(rng.choice(words, size=n))  # about a token a word; distinct per length: no cache hits
        prompt = f"<|user|>\n<|image_1|>\n{text}\nSummarise.<|end|>\n<|assistant|>\n"
        img = noise_image(1344, 1344, 400 + n)
        before = dict(llm.engine.stats)
        ttft, c = _timed_first_token(llm, prompt, img)
        key = f"f_{n // 1000}k"
        res[key + "_prompt_tokens"] = c.usage["prompt_tokens"]
        res[key + "_ttft_s"] = ttft
        res[key + "_prefill_steps"] = llm.engine.stats["prefill_steps"] - before["prefill_steps"]
        c = llm.generate(prompt.replace("Summarise", "Summarise briefly"), [img],
                         SamplingParams(max_tokens=128, ignore_eos=True), num_crops=16)
        res[key + "_decode_tok_s"] = c.timings["decode_tokens_per_s"]


def _ttft(llm: Any, res: dict[str, Any], crops: tuple[int, ...], ttft_reps: int) -> None:
    for nc in crops:
        size = (1344, 1344) if nc >= 16 else (672, 672) if nc >= 4 else (336, 336)
        ttft = []
        for s in range(ttft_reps):
            ttft.append(_timed_first_token(llm, PROMPT, noise_image(*size, 100 + s), nc)[0])
        res[f"b_ttft_ms_{nc}crop"] = 1000 * statistics.median(ttft[1:] or ttft)


def offline_request(llm: Any, i: int, tokens: int, nc: int) -> Any:
    """Request i of the offline job (c): a noise image of the i-th mixed size (the image decode's stand-in)
    prepared with `nc` crops, `tokens` new tokens with eos ignored."""
    from phi3v import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    return llm.prepare(PROMPT, [noise_image(*MIXED_SIZES[i % len(MIXED_SIZES)], 1000 + i)], params, nc)


def _offline(llm: Any, res: dict[str, Any], crops: tuple[int, ...], n_offline: int, offline_tokens: int,
             prep_workers: int | None, profile: bool = False) -> None:
    phases = ("vision_s", "embeds_s", "decoder_prefill_s")
    llm.engine.runner.time_phases = profile  # syncs around vision / embeddings / decoder prefill
    for nc in crops:
        job = functools.partial(offline_request, llm, nc=nc)  # job(i, tokens), on the prep threads

        # warm-up, untimed (as (a) and (b) exclude theirs): the same shapes on other images, 2 tokens
        # each, so that one-time Triton compiles and CUDA-graph captures (vision bucket, batch 64) are done
        llm.generate_many([functools.partial(job, n_offline + i, 2) for i in range(n_offline)], prep_workers)
        _sync()
        t = time.perf_counter()
        before = dict(llm.engine.stats)
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0
        jobs = [functools.partial(job, i, offline_tokens) for i in range(n_offline)]
        if prep_workers == 0:  # everything prepared first, on this thread: the engine runs alone
            jobs = [j() for j in jobs]
        outs = llm.generate_many(jobs, prep_workers)
        _sync()
        dt = time.perf_counter() - t  # preprocessing included
        st = {k: v - before.get(k, 0) for k, v in llm.engine.stats.items()}
        res[f"c_offline_{nc}crop_phases"] = {  # where the wall time went (host view)
            "wall_s": dt, "prefill_s": st["prefill_s"], "decode_s": st["decode_s"], "prefill_steps": st["prefill_steps"],
            "decode_steps": st["decode_steps"], "mean_decode_batch": st["decode_rows"] / max(1, st["decode_steps"]),
            "prompt_tokens_mean": st["prefill_tokens"] / n_offline,
            "alloc_retries": (torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries)
            if torch.cuda.is_available() else 0, **({k: st.get(k, 0.0) for k in phases} if profile else {})}
        res[f"c_offline_{nc}crop_images_per_s"] = n_offline / dt
        res[f"c_offline_{nc}crop_tokens_per_s"] = sum(len(o.token_ids) for o in outs) / dt


def kv_capacity(llm: Any, free_bytes: int, utilization: float, out_tokens: int) -> dict[str, Any]:
    """How many 16-crop sequences (the (a) prompt + `out_tokens`) the KV cache holds when it is sized as the
    engine sizes it (free GPU memory after the weights x utilization - 2 GiB of activation headroom), not
    capped by max_num_seqs: what the memory freed by quantized weights buys. `free_bytes`: free memory
    right after loading, the engine's own cache counted as free."""
    from phi3v import SamplingParams
    from phi3v.engine.kv_cache import KVCache

    eng, cfg = llm.engine, llm.config
    bpt = KVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, eng.cache.kv_dtype)
    budget = int(free_bytes * utilization) - (2 << 30)
    prompt = len(llm.prepare(PROMPT, [noise_image(1344, 1344, 0)], SamplingParams(), num_crops=16).prompt_ids)
    bs = eng.cache.block_size
    per_seq = -(-(prompt + out_tokens) // bs)  # blocks
    blocks = max(0, budget // (bs * bpt))
    return {"d_kv_budget_gib": budget / 2**30, "d_kv_bytes_per_token": bpt, "d_16crop_seq_tokens": prompt + out_tokens,
            "d_concurrent_16crop_seqs": blocks // per_seq, "d_kv_blocks_allocated": eng.cache.n_blocks}


def cmd_bench(a: argparse.Namespace) -> int:
    from phi3v import LLM
    from phi3v.cli import engine_switches, quant_spec

    model = a.model
    if a.random:
        model = write_random_checkpoint(a.random, a.tokenizer or a.random, a.out_dir)
    if not model:
        raise ValueError("give --model FOLDER_OR_REPO or --random CONFIG_DIR --tokenizer DIR")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    quant = quant_spec(a)
    llm = LLM(model, device=a.device, dtype=a.dtype, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
              gpu_memory_utilization=a.gpu_memory_utilization, kv_cache_dtype=a.kv_cache_dtype, quantization=quant,
              **engine_switches())
    load_s = time.perf_counter() - t
    capacity: dict[str, Any] = {}
    if llm.device.type == "cuda":  # before warmup: what the engine saw when it sized its cache
        c = llm.engine.cache
        cache_bytes = 2 * c.k.numel() * c.k.element_size()
        free = torch.cuda.mem_get_info(llm.device)[0] + cache_bytes
        capacity = kv_capacity(llm, free, a.gpu_memory_utilization, a.offline_tokens)
        capacity["d_weights_gib"] = sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**30
    t = time.perf_counter()
    llm.warmup()  # every CUDA graph and blank requests, as the server and batch jobs do at start
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if llm.device.type == "cuda" else "cpu",
                           "kv_cache_dtype": a.kv_cache_dtype, "quantization": a.quantization,
                           "quantize_lm_head": a.quantize_lm_head,
                           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "load_s": load_s,
                           "warmup_s": time.perf_counter() - t, "command": " ".join(["phi3v"] + sys.argv[1:])}
    res.update(run_bench(llm, a.decode_tokens, n_offline=a.n_offline, offline_tokens=a.offline_tokens, parts=a.parts,
                         prep_workers=a.prep_workers, profile=a.profile_prefill))
    res.update(capacity)
    if a.compare:
        with open(a.compare, encoding="utf-8") as f:
            res["ratios_vs_reference"] = ratios(res, json.load(f))
    emit(res, a.json_out)
    return 0


def ratios(res: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """phi3v vs the reference recipe, > 1 = phi3v better: throughput phi3v/ref, TTFT and memory ref/phi3v."""
    return {k: (res[k] / ref[k] if k.startswith(("a_", "c_")) else ref[k] / res[k])
            for k in res if k in ref and isinstance(ref[k], (int, float)) and isinstance(res[k], (int, float)) and ref[k]}


def cuda_median_ms(fn: Any, reps: int) -> float:
    """Median over `reps` calls of fn's GPU time in ms, each between two CUDA events (benchmarks/ scripts)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def graph_ms(fn: Any, reps: int = 10) -> float:
    """Median ms of one replay of a CUDA graph of fn (benchmarks/ sweeps: a decode step's kernels run from graphs,
    so eager launches would time the host, not the kernel). fn runs once eagerly first, on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    return cuda_median_ms(g.replay, reps)


def emit(res: dict[str, Any], path: str | None) -> None:
    """Print a result dict as JSON, and write it to `path` when given (benchmark scripts share this)."""
    text = json.dumps(res, indent=1)
    print(text)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
