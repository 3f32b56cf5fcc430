"""`phi3v batch`: thousands of requests from a JSONL file through the engine, resumable.

Each input line is `{"id": ..., "prompt": "..."|"messages": [...], "images": [...], "max_tokens": ...,
"temperature": ..., "num_crops": ...}` (`prompt` may be plain text: it is wrapped in a user turn
with the images first). Each output line is `{"id", "text", "finish_reason", "usage"}` or
`{"id", "error"}`: a bad request is recorded and the others go on. Requests whose id is already in
the output file are skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from phi3v.engine.sampler import SamplingParams

_PARAM_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop", "ignore_eos",
               "json_schema", "json_object"}


def _done_ids(path: str) -> set[str]:
    done: set[str] = set()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(str(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run is rewritten
    return done


def _prepare(llm: Any, rec: dict[str, Any], base: SamplingParams, image_dir: str | None) -> Any:
    if not isinstance(rec, dict):
        raise ValueError("each line must be a JSON object")
    overrides = {k: rec[k] for k in _PARAM_KEYS if k in rec}
    params = dataclasses.replace(base, **overrides)
    images = rec.get("images") or []
    if not isinstance(images, list):
        raise ValueError("images must be a list of paths or URLs")
    if image_dir:
        images = [i if not isinstance(i, str) or "://" in i or i.startswith("data:") or os.path.isabs(i)
                  else os.path.join(image_dir, i) for i in images]
    nc = rec.get("num_crops")
    if "messages" in rec:
        return llm.prepare_chat(rec["messages"], params, nc)
    prompt = rec.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("each request needs a 'prompt' string or 'messages'")
    if "<|user|>" not in prompt:
        tags = "".join(f"<|image_{i + 1}|>\n" for i in range(len(images)))
        prompt = f"<|user|>\n{tags}{prompt}<|end|>\n<|assistant|>\n"
    return llm.prepare(prompt, images, params, nc)


def run_batch(a: argparse.Namespace, base: SamplingParams, load: Callable[[argparse.Namespace], Any]) -> int:
    if a.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    with open(a.input, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    done = _done_ids(a.output)
    llm = load(a)
    n_ok = n_err = n_skip = 0
    with open(a.output, "a", encoding="utf-8") as out:
        chunk: list[tuple[str, Any]] = []

        def flush() -> None:
            """Prepare the chunk on a thread pool (a bad request is recorded, the others go on), then
            generate all of its good requests as one engine batch."""
            nonlocal n_ok, n_err
            if not chunk:
                return

            def prep(item: tuple[str, Any]) -> Any:
                try:
                    return _prepare(llm, item[1], base, a.image_dir)
                except (ValueError, OSError) as e:
                    return " ".join(str(e).split())

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
                prepared = list(pool.map(prep, chunk))
            good = [(rid, p) for (rid, _), p in zip(chunk, prepared) if not isinstance(p, str)]
            for (rid, _), p in zip(chunk, prepared):
                if isinstance(p, str):
                    out.write(json.dumps({"id": rid, "error": p}, ensure_ascii=False) + "\n")
                    n_err += 1
            for (rid, _), c in zip(good, llm.generate_many([p for _, p in good])):
                out.write(json.dumps({"id": rid, "text": c.text, "finish_reason": c.finish_reason, "usage": c.usage},
                                     ensure_ascii=False) + "\n")
                n_ok += 1
            out.flush()
            chunk.clear()

        for n, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError as e:
                rec, err = {"id": f"line-{n + 1}"}, f"invalid JSON: {e}"
            else:
                err = None
            rid = str(rec.get("id", f"line-{n + 1}")) if isinstance(rec, dict) else f"line-{n + 1}"
            if rid in done:
                n_skip += 1
                continue
            if err is None:
                chunk.append((rid, rec))
            else:
                out.write(json.dumps({"id": rid, "error": err}, ensure_ascii=False) + "\n")
                n_err += 1
            if len(chunk) >= a.batch_size:
                flush()
        flush()
    print(f"phi3v batch: {n_ok} done, {n_err} failed, {n_skip} skipped (already in {a.output})", file=sys.stderr)
    return 0
