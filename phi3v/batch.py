"""`phi3v batch`: thousands of requests (a folder, a glob, JSONL, CSV, Parquet or a saved dataset: batch_io.py)
through the engine, resumable.

Each JSONL input line is `{"id": ..., "prompt": "..."|"messages": [...], "images": [...], "max_tokens": ...,
"temperature": ..., "num_crops": ...}` (`prompt` may be plain text: it is wrapped in a user turn
with the images first). Each output line is `{"id", "text", "finish_reason", "usage"}` or
`{"id", "error"}`: a bad request is recorded and the others go on. Results are written in the order
they finish. Requests whose id is already in the output file are skipped, so an interrupted run
continues where it stopped.

Nothing one line does stops the job: whatever its preparation or its result raises becomes its `error`
record. A line whose id an earlier line already has gets an error record naming both lines (with a
`line` field; such records do not mark the id done). On resume a torn last line (a crash mid-write) is
cut off before anything is appended, and the output is fsynced at least every `--fsync-interval`
seconds, so a crash loses at most that much and never glues a record to a fragment.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import IO, Any, Callable

from phi3v import batch_io
from phi3v.sampling_params import SamplingParams

_PARAM_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop", "ignore_eos",
               "json_schema", "json_object", "lora"}


def _done_ids(path: str) -> tuple[set[str], set[int]]:
    """(ids with a record, input lines already reported as duplicates) in an existing output."""
    done: set[str] = set()
    dup_lines: set[int] = set()
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    if "line" in rec:
                        dup_lines.add(int(rec["line"]))
                    else:
                        done.add(str(rec["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
    return done, dup_lines


class _Output:
    """Appends one JSON record per line: flushed at once, fsynced at least every `interval` seconds and at close."""

    def __init__(self, f: IO[str], interval: float) -> None:
        self.f, self.interval, self.synced = f, interval, time.monotonic()

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (from the input) cannot be written as UTF-8: escaped
            line = json.dumps(rec) + "\n"
        self.f.write(line)
        self.f.flush()
        now = time.monotonic()
        if now - self.synced >= self.interval:
            os.fsync(self.f.fileno())
            self.synced = now

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, ValueError) and text else f"{type(e).__name__}: {text}".rstrip(": ")


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
    interval = getattr(a, "fsync_interval", 1.0)
    if interval < 0:
        raise ValueError("--fsync-interval must be >= 0")
    items = batch_io.read_job_inputs(a)
    journal = batch_io.journal_path(a.output)  # the output itself, or the JSONL journal of a Parquet output
    torn = batch_io.cut_torn_tail(journal)
    if torn:
        print(f"phi3v batch: removed a torn last line ({torn} bytes) from {journal}", file=sys.stderr)
    done, dup_lines = _done_ids(journal)
    done |= batch_io.done_ids(a.output)
    ids = {it.id for it in items}  # a duplicate id is one error record, not one more request
    progress = batch_io.Progress(len(ids - done), len(ids & done), a.output, disable=getattr(a, "quiet", False))
    with open(journal, "a", encoding="utf-8") as f:
        out = _Output(f, interval)

        def write(rec: dict[str, Any], n_images: int = 1) -> None:
            out.write(rec)
            progress.update(rec, n_images)

        todo = _plan(items, done, dup_lines, write)
        llm = load(a) if todo else None  # a resume with nothing left to run loads no model
        if llm is not None:
            llm.warmup()  # every CUDA graph (and first kernel use) up front: none is captured mid-run

        def prep(rec: dict[str, Any]) -> Any:  # a bad request becomes its error, returned, not raised
            try:
                return _prepare(llm, rec, base, a.image_dir)
            except Exception as e:  # noqa: BLE001 - whatever one line raises is that line's error record
                return ValueError(_one_line(e))

        for i, _delta, result in (llm.run([functools.partial(prep, rec) for _, rec in todo]) if todo else ()):
            if result is None:
                continue
            rid, rec = todo[i]
            try:
                if isinstance(result, Exception):
                    raise result
                write(batch_io.make_record(rid, result), len(rec.get("images") or []))
            except Exception as e:  # noqa: BLE001
                write(batch_io.make_record(rid, error=_one_line(e)))
        out.close()
    batch_io.finish_output(a.output)
    print(progress.close(), file=sys.stderr)
    return 0


def _plan(items: list[batch_io.InputItem], done: set[str], dup_lines: set[int],
          write: Callable[[dict[str, Any]], None]) -> list[tuple[str, Any]]:
    """The requests to run: unusable inputs and duplicate ids are written as errors here (a duplicate once, named
    by its input position), ids already done are skipped."""
    todo: list[tuple[str, Any]] = []
    first: dict[str, int] = {}
    for n, it in enumerate(items, 1):
        if it.id in first:
            if n not in dup_lines:
                write({"id": it.id, "line": n, "error": f"duplicate id {it.id!r}: input line {n} repeats the id of input line "
                                                        f"{first[it.id]}; give every request its own id"})
            continue
        first[it.id] = n
        if it.id in done:
            continue
        if it.error is not None:
            write(batch_io.make_record(it.id, error=it.error))
        else:
            todo.append((it.id, it.request))
    return todo
