"""`phi3v batch`: thousands of requests from a JSONL file through the engine, resumable.

Each input line is `{"id": ..., "prompt": "..."|"messages": [...], "images": [...], "max_tokens": ...,
"temperature": ..., "num_crops": ...}` (`prompt` may be plain text: it is wrapped in a user turn
with the images first). Each output line is `{"id", "text", "finish_reason", "usage"}` or
`{"id", "error"}`: a bad request is recorded and the others go on. Results are written in the order
they finish. Requests whose id is already in the output file are skipped, so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable

from phi3v import batch_io
from phi3v.sampling_params import SamplingParams

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
    """Stream every request not yet in the output through one engine run: requests are prepared on
    threads a bounded window ahead and join the running batch as they become ready, and each result
    is written (and flushed) as soon as it finishes, so the GPU never waits for a chunk's slowest
    request and an interrupted run loses nothing that finished."""
    if a.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    items = batch_io.read_job_inputs(a)
    journal = batch_io.journal_path(a.output)  # the output itself, or the JSONL journal of a Parquet output
    done = _done_ids(journal) | batch_io.done_ids(a.output)
    llm = load(a)
    llm.warmup()  # every CUDA graph (and first kernel use) up front: none is captured mid-run

    def prep(rec: dict[str, Any]) -> Any:  # a bad request becomes its error, returned, not raised
        try:
            return _prepare(llm, rec, base, a.image_dir)
        except (ValueError, OSError) as e:
            return ValueError(" ".join(str(e).split()))

    todo = [(it.id, it.request) for it in items if it.id not in done and it.error is None]
    progress = batch_io.Progress(sum(it.id not in done for it in items), sum(it.id in done for it in items), a.output,
                                 disable=getattr(a, "quiet", False))
    with open(journal, "a", encoding="utf-8") as out:
        def write(rec: dict[str, Any], n_images: int = 1) -> None:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            progress.update(rec, n_images)

        for it in items:
            if it.id not in done and it.error is not None:
                write(batch_io.make_record(it.id, error=it.error))
        for i, _delta, result in llm.run([functools.partial(prep, rec) for _, rec in todo]):
            if result is None:
                continue
            rid, rec = todo[i]
            if isinstance(result, Exception):
                write(batch_io.make_record(rid, error=str(result)))
            else:
                write(batch_io.make_record(rid, result), len(rec.get("images") or []))
    batch_io.finish_output(a.output)
    print(progress.close(), file=sys.stderr)
    return 0
