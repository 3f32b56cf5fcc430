"""Compare xgrammar and llguidance for the Phi-3 vocabulary (CPU only; no model needed).

For each library: tokenizer-table build time, JSON-schema compile time (cold), and the time to
fill one token bitmask, along two paths through each schema: the tokens of a valid instance
(what a trained model does) and a seeded random walk over allowed tokens (what the tiny random
checkpoint does). Both libraries are optional: a missing one is skipped.

Usage: python benchmarks/grammar_libs.py [--tokenizer tests/data/tiny-phi3v] [--walks 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32064
EOS = [32000, 32007, 2]

SCHEMAS: dict[str, tuple[dict, object]] = {
    "book": ({"type": "object", "properties": {"title": {"type": "string"}, "author": {"type": "string"}},
              "required": ["title", "author"], "additionalProperties": False},
             {"title": "The Hobbit", "author": "J. R. R. Tolkien"}),
    "receipt": ({"type": "object", "properties": {
        "store": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "currency": {"enum": ["USD", "EUR", "GBP"]},
        "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
            "price": {"type": "number"}}, "required": ["name", "qty", "price"], "additionalProperties": False}},
        "total": {"type": "number"}, "paid": {"type": "boolean"}},
        "required": ["store", "items", "total"], "additionalProperties": False},
        {"store": "Corner Shop", "date": "2024-05-01", "currency": "EUR",
         "items": [{"name": "Coffee beans", "qty": 2, "price": 7.5}, {"name": "Milk", "qty": 1, "price": 1.25}],
         "total": 16.25, "paid": True}),
    "json_object": ({"type": "object"}, {"a": [1, 2, {"b": None}], "c": "d"}),
}


def walk_times(new, fill, consume, allowed_of, tokens: list[int] | None, seed: int, limit: int = 200) -> list[float]:
    """Time each mask fill along `tokens` (or a random walk when None)."""
    m = new()
    rng = random.Random(seed)
    times = []
    for step in range(limit):
        t0 = time.perf_counter()
        fill(m)
        times.append(time.perf_counter() - t0)
        allowed = allowed_of()
        if tokens is not None:
            if step >= len(tokens):
                break
            tok = tokens[step]
            assert allowed[tok], f"token {tok} of the instance not allowed at step {step}: {tokens}"
        else:
            ids = np.flatnonzero(allowed)
            if len(ids) == 0:
                break
            tok = int(ids[rng.randrange(len(ids))])
        if tok in EOS:
            break
        consume(m, tok)
    return times


def unpack(mask: np.ndarray) -> np.ndarray:
    return np.unpackbits(mask.view(np.uint8), bitorder="little")[:VOCAB].astype(bool)


def bench_llguidance(tok_json: str, instance_ids: dict[str, list[int]], walks: int) -> dict:
    import llguidance as llg
    import llguidance.numpy as lln

    res: dict = {"version": llg.__version__}
    t0 = time.perf_counter()
    lt = llg.LLTokenizer(tok_json, n_vocab=VOCAB, eos_token=EOS)
    res["tokenizer_s"] = time.perf_counter() - t0
    mask = lln.allocate_token_bitmask(1, VOCAB)
    for name, (schema, _inst) in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        err = llg.LLMatcher.validate_grammar(grammar, lt)
        assert not err, err
        m0 = llg.LLMatcher(lt, grammar)
        compile_s = time.perf_counter() - t0
        new = lambda g=grammar: llg.LLMatcher(lt, g)  # noqa: E731
        fill = lambda m: lln.fill_next_token_bitmask(m, mask, 0)  # noqa: E731
        consume = lambda m, t: m.consume_token(t) or (_ for _ in ()).throw(RuntimeError(m.get_error()))  # noqa: E731
        allowed = lambda: unpack(mask[0])  # noqa: E731
        inst = walk_times(new, fill, consume, allowed, instance_ids[name], 0)
        rnd = sum((walk_times(new, fill, consume, allowed, None, s) for s in range(walks)), [])
        res[name] = summary(compile_s, inst, rnd)
        del m0
    return res


def bench_xgrammar(tok_folder: str, instance_ids: dict[str, list[int]], walks: int) -> dict:
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    from importlib.metadata import version

    res: dict = {"version": version("xgrammar")}
    hf = PreTrainedTokenizerFast(tokenizer_file=str(Path(tok_folder) / "tokenizer.json"))
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=EOS)
    comp = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    res["tokenizer_s"] = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    for name, (schema, _inst) in SCHEMAS.items():
        t0 = time.perf_counter()
        if name == "json_object":  # its schema path ignores `separators` for untyped values
            cg = comp.compile_builtin_json_grammar()
        else:
            cg = comp.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        compile_s = time.perf_counter() - t0
        new = lambda cg=cg: xgr.GrammarMatcher(cg)  # noqa: E731
        fill = lambda m: m.fill_next_token_bitmask(mask, 0)  # noqa: E731
        consume = lambda m, t: m.accept_token(t) or (_ for _ in ()).throw(RuntimeError("rejected"))  # noqa: E731
        allowed = lambda: unpack(mask[0].numpy())  # noqa: E731
        inst = walk_times(new, fill, consume, allowed, instance_ids[name], 0)
        rnd = sum((walk_times(new, fill, consume, allowed, None, s) for s in range(walks)), [])
        res[name] = summary(compile_s, inst, rnd)
    del torch
    return res


def summary(compile_s: float, inst: list[float], rnd: list[float]) -> dict:
    us = lambda xs: {"mean_us": 1e6 * statistics.mean(xs), "p50_us": 1e6 * statistics.median(xs),  # noqa: E731
                     "max_us": 1e6 * max(xs), "n": len(xs)}
    return {"compile_ms": 1e3 * compile_s, "instance_path": us(inst), "random_walk": us(rnd)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(ROOT / "tests" / "data" / "tiny-phi3v"))
    ap.add_argument("--walks", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from phi3v.processing.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(a.tokenizer)
    tok_json = (Path(a.tokenizer) / "tokenizer.json").read_text()
    instance_ids = {}
    for name, (_s, inst) in SCHEMAS.items():
        # "\n" in front: no "▁" prefix-space piece on the first token (the prompt ends with "\n")
        instance_ids[name] = tok.encode("\n" + json.dumps(inst, separators=(",", ":")), add_bos=False)[2:] + [EOS[1]]
    out = {}
    for lib, fn, arg in (("llguidance", bench_llguidance, tok_json), ("xgrammar", bench_xgrammar, a.tokenizer)):
        try:
            out[lib] = fn(arg, instance_ids, a.walks)
        except ImportError as e:
            out[lib] = {"skipped": f"not installed ({e.name})"}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
