"""Decode tokens/s with and without a JSON schema (structured output), at several batch sizes.

Both runs decode exactly `--tokens` tokens per request: free requests ignore eos, and the schema
(a receipt: an array of at least `--tokens` line items of strings and numbers) cannot be complete
before then, so every step of both runs has the same batch. Timing is at the engine: from after
the prefill step to the last token (the decode steps only), synchronised on CUDA. The CPU time
spent filling masks and feeding tokens to the matchers is reported too.

GPU (full-size random bf16 weights with the real Phi-3-vision config, as `phi3v bench --random` writes them):
    python benchmarks/json_overhead.py --model full-random --out benchmarks/results/json_overhead.json
CPU smoke run with the tiny checkpoint:
    python benchmarks/json_overhead.py --model tests/data/tiny-phi3v --device cpu --dtype fp32 --batch 1 4 --tokens 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3v import LLM, SamplingParams  # noqa: E402
from phi3v.bench import emit  # noqa: E402
from phi3v.engine.grammar import Grammars  # noqa: E402

DATA = ROOT / "tests" / "data"
PROMPT = "<|user|>\nList the items of this receipt as JSON.<|end|>\n<|assistant|>\n"


def receipt_schema(min_items: int) -> dict:
    item = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 999},
                                             "price": {"type": "number"}},
            "required": ["name", "qty", "price"], "additionalProperties": False}
    return {"type": "object", "properties": {"store": {"type": "string", "maxLength": 24},
                                             "items": {"type": "array", "items": item, "minItems": min_items}},
            "required": ["store", "items"], "additionalProperties": False}


class Timers:
    """Wraps Grammars.fill_masks / accept to add up their host time."""

    def __init__(self) -> None:
        self.fill = self.accept = 0.0
        Grammars.fill_masks = self._timed(Grammars.fill_masks, "fill")
        Grammars.accept = self._timed(Grammars.accept, "accept")

    def _timed(self, fn, total: str):
        def timed(g, *a, **k):
            t = time.perf_counter()
            try:
                return fn(g, *a, **k)
            finally:
                setattr(self, total, getattr(self, total) + time.perf_counter() - t)

        return timed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_run(llm: LLM, batch: int, tokens: int, schema: dict | None, temperature: float,
               timers: Timers) -> dict:
    eng = llm.engine
    params = [SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=temperature, seed=i, json_schema=schema)
              for i in range(batch)]
    reqs = [llm.prepare(PROMPT, [], p) for p in params]
    for r in reqs:
        eng.add_request(r.prompt_ids, r.images, r.params)
    n = 0
    while eng.num_waiting:  # prefill (and first token) of every request
        n += len(eng.step())
    assert eng.num_running == batch, "batch does not fit the engine's slots: raise --max-num-seqs"
    sync(eng.device)
    f0, a0, steps0 = timers.fill, timers.accept, eng.stats["decode_steps"]
    t = time.perf_counter()
    reasons = []
    while eng.has_unfinished():
        outs = eng.step()
        n += len(outs)
        reasons += [o.finish_reason for o in outs if o.finished]
    sync(eng.device)
    dt = time.perf_counter() - t
    steps = eng.stats["decode_steps"] - steps0
    # tokens - 1 decode steps, plus one wasted run-ahead step when free rows finish together (CUDA)
    assert n == batch * tokens and tokens - 1 <= steps <= tokens and set(reasons) == {"length"}, (n, steps, set(reasons))
    return {"decode_tok_s": batch * (tokens - 1) / dt, "step_ms": 1e3 * dt / steps,
            "mask_fill_ms_per_step": 1e3 * (timers.fill - f0) / steps,
            "accept_ms_per_step": 1e3 * (timers.accept - a0) / steps}


def load(a: argparse.Namespace) -> LLM:
    model = a.model
    if model == "full-random":
        from phi3v.config import Phi3VConfig
        from phi3v.models.weights import random_checkpoint

        if not os.path.isfile(os.path.join(a.folder, "config.json")):
            cfg = Phi3VConfig.from_pretrained(str(DATA / "real-configs" / "phi-3-vision-128k-instruct"))
            random_checkpoint(cfg, a.folder, device="cuda" if torch.cuda.is_available() else "cpu", seed=0)
            for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copyfile(DATA / "tiny-phi3v" / fn, os.path.join(a.folder, fn))
        model = a.folder
    return LLM(model, device=a.device, dtype=a.dtype, max_num_seqs=max(a.max_num_seqs, max(a.batch)),
               max_model_len=a.max_model_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="full-random", help="checkpoint folder, or full-random (written to --folder)")
    ap.add_argument("--folder", default="/tmp/phi3v-full-random")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=256, help="decoded tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (the median is reported)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    llm = load(a)
    timers = Timers()
    schema = receipt_schema(a.tokens)
    res: dict = {"device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": a.model,
                 "tokens": a.tokens, "temperature": a.temperature, "cases": {}}
    for b in a.batch:
        for mode, s in (("free", None), ("schema", schema)):
            decode_run(llm, b, min(a.tokens, 16), s, a.temperature, timers)  # warm-up (graphs, compile caches)
            runs = [decode_run(llm, b, a.tokens, s, a.temperature, timers) for _ in range(a.repeats)]
            best = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
            res["cases"][f"batch{b}_{mode}"] = {**best, "all_tok_s": [r["decode_tok_s"] for r in runs]}
            print(f"batch {b:3d} {mode:6s}: {best['decode_tok_s']:9.1f} tok/s  step {best['step_ms']:.2f} ms  "
                  f"mask fill {best['mask_fill_ms_per_step']:.3f} ms  accept {best['accept_ms_per_step']:.3f} ms",
                  flush=True)
        free, cons = res["cases"][f"batch{b}_free"], res["cases"][f"batch{b}_schema"]
        res["cases"][f"batch{b}_overhead_pct"] = 100 * (1 - cons["decode_tok_s"] / free["decode_tok_s"])
        print(f"batch {b:3d} overhead: {res['cases'][f'batch{b}_overhead_pct']:.1f} %", flush=True)
    res["median_all"] = {k: statistics.median(v["all_tok_s"]) for k, v in res["cases"].items() if isinstance(v, dict)}
    emit(res, a.out)


if __name__ == "__main__":
    main()
