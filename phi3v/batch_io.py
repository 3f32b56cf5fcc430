"""`phi3v batch` inputs and outputs: what people have, as typed records.

Inputs (`read_inputs`), chosen by what `--input` names:
- a folder (recursive; files with an image extension; one `--prompt` for all): id = the path relative to the folder;
- a glob (`'scans/**/*.jpg'`): id = the path relative to the glob's fixed leading folders;
- a Hugging Face dataset saved with `save_to_disk` (a folder holding `dataset_info.json` or `state.json`),
  a `.csv` or `.parquet` file: one row per request, `--image-column` (a path, URL, image bytes or a
  `{"bytes", "path"}` struct), `--prompt-column` (else `--prompt`), `--id-column` (else the row number);
- anything else: JSONL, one request object per line (as `phi3v batch` always took).
Each input becomes an `InputItem`: its id and a request in the JSONL shape (`prompt`, `images`, ...), or the
error that makes it unusable (written in its place: one record per input, whatever happens).

Outputs (`journal_path`, `finish_output`, `done_ids`): JSONL, or Parquet when `--output` ends in `.parquet`.
A Parquet file cannot be appended to, so a Parquet job writes its records to the JSONL journal
`OUTPUT.partial.jsonl` as they finish (the resume state) and turns journal + any earlier Parquet into
`OUTPUT` (atomically, by rename) at the end.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from phi3v.extras import install_hint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
RECORD_KEYS = ("id", "text", "finish_reason", "usage", "timings", "error")


@dataclass
class InputItem:
    id: str
    request: dict[str, Any] | None  # the JSONL shape: prompt|messages, images, max_tokens, ...
    error: str | None = None  # set when the input itself is unusable (the request is then None)


@dataclass
class Columns:
    image: str = "image"
    prompt: str | None = None  # None: every row takes --prompt
    id: str | None = None  # None: the row number


# ---------------------------------------------------------------- which reader


def read_job_inputs(a: Any) -> list[InputItem]:
    """The inputs of a `phi3v batch` command line (its --input, --prompt, columns, --image-dir, --limit, --num-crops).
    Raises ValueError when there is none (an empty folder, a glob that matches no image)."""
    items = list(read_inputs(a.input, a.prompt, Columns(a.image_column, a.prompt_column, a.id_column), a.image_dir,
                             a.limit, {"num_crops": a.num_crops} if a.num_crops is not None else None))
    if not items:
        kind = input_kind(a.input)
        what = f"no image file ({', '.join(IMAGE_EXTENSIONS)})" if kind in ("folder", "glob") else "no request"
        raise ValueError(f"--input {a.input!r} ({kind}) holds {what}")
    return items


def input_kind(path: str) -> str:
    """folder | glob | dataset | csv | parquet | jsonl."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "dataset"
        return "folder"
    if any(c in path for c in "*?[") and not os.path.exists(path):
        return "glob"
    ext = os.path.splitext(path)[1].lower()
    return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(ext, "jsonl")


def read_inputs(path: str, prompt: str | None = None, columns: Columns | None = None,
                image_dir: str | None = None, limit: int | None = None,
                defaults: dict[str, Any] | None = None) -> Iterator[InputItem]:
    """Every input of `path` in a stable order (the same on every run: resume and --limit rely on it).
    `defaults`: request keys (e.g. num_crops from --num-crops) for the requests that do not set them."""
    kind = input_kind(path)
    if kind in ("folder", "glob") and prompt is None:
        raise ValueError(f"--input {path!r} is a {kind} of images: give the question for all of them with --prompt")
    cols = columns or Columns()
    it: Iterator[InputItem]
    if kind == "folder":
        it = _image_files(path, _walk(path), prompt or "")
    elif kind == "glob":
        it = _image_files(_glob_root(path), sorted(globlib.glob(path, recursive=True)), prompt or "")
    elif kind == "jsonl":
        it = _jsonl(path)
    else:
        rows = {"csv": _csv_rows, "parquet": _parquet_rows, "dataset": _dataset_rows}[kind](path)
        base = image_dir or (os.path.dirname(os.path.abspath(path)) if kind != "dataset" else None)
        it = (_row_item(i, row, cols, prompt, base) for i, row in enumerate(rows))
    for n, item in enumerate(it):
        if limit is not None and n >= limit:
            return
        if item.request is not None:
            for k, v in (defaults or {}).items():
                item.request.setdefault(k, v)
        yield item


def _walk(root: str) -> list[str]:
    out = []
    for d, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        out += [os.path.join(d, f) for f in sorted(files)]
    return out


def _glob_root(pattern: str) -> str:
    parts = pattern.split(os.sep)
    fixed = []
    for p in parts[:-1]:
        if any(c in p for c in "*?["):
            break
        fixed.append(p)
    return os.sep.join(fixed) or "."


def _image_files(root: str, paths: list[str], prompt: str) -> Iterator[InputItem]:
    for p in paths:
        if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS):
            rid = os.path.relpath(p, root).replace(os.sep, "/")
            yield InputItem(rid, {"prompt": prompt, "images": [os.path.abspath(p)]})


def _jsonl(path: str) -> Iterator[InputItem]:
    # invalid UTF-8 stays in the text (surrogate escapes): that request fails alone, with its own error record
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        n = 0
        for line in f:
            if not line.strip():
                continue
            n += 1
            try:
                rec = json.loads(line)
            except ValueError as e:
                yield InputItem(f"line-{n}", None, f"invalid JSON: {e}")
                continue
            if not isinstance(rec, dict):
                yield InputItem(f"line-{n}", None, "each line must be a JSON object")
                continue
            yield InputItem(str(rec.get("id", f"line-{n}")), rec)


def _csv_rows(path: str) -> Iterator[dict[str, Any]]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def _parquet_rows(path: str) -> Iterator[dict[str, Any]]:
    pq = _need("pyarrow.parquet", "Parquet input")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        yield from batch.to_pylist()


def _dataset_rows(path: str) -> Iterator[dict[str, Any]]:
    datasets = _need("datasets", "a Hugging Face dataset")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path!r} holds the splits {sorted(ds)}: give the folder of one split")
        ds = next(iter(ds.values()))
    for name, feat in ds.features.items():  # Image features come back as {"bytes", "path"}, not decoded PIL images
        if type(feat).__name__ == "Image":
            ds = ds.cast_column(name, datasets.Image(decode=False))
    yield from ds


def _need(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs {module.split('.')[0]}: {install_hint('ray')}") from None


def _row_item(i: int, row: dict[str, Any], cols: Columns, prompt: str | None, base: str | None) -> InputItem:
    rid = str(row.get(cols.id)) if cols.id and row.get(cols.id) is not None else str(i)
    if cols.id and cols.id not in row:
        return InputItem(rid, None, f"the row has no column {cols.id!r} (--id-column); it has {sorted(row)}")
    text = row.get(cols.prompt) if cols.prompt else prompt
    if not isinstance(text, str) or not text:
        what = f"no text in column {cols.prompt!r} (--prompt-column)" if cols.prompt else "no --prompt"
        return InputItem(rid, None, f"{what}; every row needs a question")
    if cols.image not in row:
        return InputItem(rid, None, f"the row has no column {cols.image!r} (--image-column); it has {sorted(row)}")
    try:
        image = _image_value(row[cols.image], base)
    except ValueError as e:
        return InputItem(rid, None, str(e))
    return InputItem(rid, {"prompt": text, "images": [] if image is None else [image]})


def _image_value(v: Any, base: str | None) -> Any:
    """A cell -> what `load_image` takes: a path (relative ones against `base`), URL, or bytes; None: no image."""
    if isinstance(v, dict):  # the {"bytes", "path"} struct of HF Image features and of Parquet files written from them
        v = v.get("bytes") or v.get("path")
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if not isinstance(v, str):
        raise ValueError(f"the image cell is a {type(v).__name__}: give a path, URL or image bytes")
    if base and "://" not in v and not v.startswith("data:") and not os.path.isabs(v):
        return os.path.join(base, v)
    return v


# ---------------------------------------------------------------- outputs


def is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


def journal_path(output: str) -> str:
    """Where the records are appended as they finish: the output itself (JSONL), or a JSONL journal (Parquet)."""
    return output + ".partial.jsonl" if is_parquet(output) else output


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL or Parquet output (a torn last JSONL line is skipped)."""
    if not os.path.exists(path):
        return []
    if is_parquet(path):
        pq = _need("pyarrow.parquet", "Parquet output")
        return [_from_parquet_row(r) for r in pq.read_table(path).to_pylist()]
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
    return out


def done_ids(output: str) -> set[str]:
    """Ids that already have a record (in the Parquet output and its journal too)."""
    ids = {str(r["id"]) for r in read_records(journal_path(output))}
    if is_parquet(output):
        ids |= {str(r["id"]) for r in read_records(output)}
    return ids


def cut_torn_tail(path: str) -> int:
    """Cut a torn last line (no final newline: a crash mid-write) off the file, so that the next record starts a
    line of its own; returns the bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos, cut = size, 0
        while pos > 0:  # back to the last newline, a block at a time
            start = max(0, pos - 65536)
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        f.truncate(cut)
        os.fsync(f.fileno())
        return size - cut


def make_record(rid: str, completion: Any = None, error: str | None = None) -> dict[str, Any]:
    if error is not None:
        return {"id": rid, "error": error}
    return {"id": rid, "text": completion.text, "finish_reason": completion.finish_reason, "usage": completion.usage,
            "timings": completion.timings}


def finish_output(output: str) -> None:
    """Parquet output: the earlier Parquet file + the journal -> OUTPUT (written aside, then renamed), journal gone."""
    if not is_parquet(output):
        return
    journal = journal_path(output)
    if not os.path.exists(journal):
        return
    pa = _need("pyarrow", "Parquet output")
    import pyarrow.parquet as pq

    seen: set[str] = set()
    rows = []
    for r in read_records(output) + read_records(journal):
        if str(r["id"]) not in seen:
            seen.add(str(r["id"]))
            rows.append(_to_parquet_row(r))
    tmp = output + ".tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema(pa)), tmp)
    os.replace(tmp, output)
    os.remove(journal)


def _parquet_schema(pa: Any) -> Any:
    usage = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64())])
    return pa.schema([("id", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("usage", usage),
                      ("timings", pa.map_(pa.string(), pa.float64())), ("error", pa.string())])


def _to_parquet_row(r: dict[str, Any]) -> dict[str, Any]:
    row = {k: r.get(k) for k in RECORD_KEYS}
    row["id"] = str(row["id"])
    if row["timings"] is not None:
        row["timings"] = list(row["timings"].items())
    return row


def _from_parquet_row(r: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row -> the JSONL record (absent fields dropped, as in JSONL)."""
    out = {k: v for k, v in r.items() if v is not None}
    if isinstance(out.get("timings"), list):
        out["timings"] = dict(out["timings"])
    return out


# ---------------------------------------------------------------- progress


class Progress:
    """A tqdm bar over the requests to run (images/s in its rate, tokens/s and failures beside it, ETA) and the
    final summary line. On stderr; quiet when tqdm is missing."""

    def __init__(self, total: int, skipped: int, output: str, disable: bool = False) -> None:
        self.total, self.skipped, self.output = total, skipped, output
        self.ok = self.failed = self.tokens = self.images = 0
        self.t0 = time.perf_counter()
        self.t_first: float | None = None  # the first record: the rate after it leaves out start-up (Ray's actors)
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, unit="img", desc="phi3v batch", disable=disable, dynamic_ncols=True,
                                 mininterval=0.5)
        except ImportError:
            self.bar = None

    def update(self, rec: dict[str, Any], n_images: int = 1) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if "error" in rec:
            self.failed += 1
        else:
            self.ok += 1
            self.tokens += int((rec.get("usage") or {}).get("completion_tokens", 0))
            self.images += n_images
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / dt:.1f} tok/s, {self.failed} failed", refresh=False)
            self.bar.update(1)

    def close(self) -> str:
        if self.bar is not None:
            self.bar.close()
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        after = ""
        if self.t_first is not None and self.ok + self.failed > 1 and now > self.t_first:
            after = f" ({(self.ok + self.failed - 1) / (now - self.t_first):.2f} records/s after the first)"
        return (f"phi3v batch: {self.ok} done, {self.failed} failed, {self.skipped} skipped (already in "
                f"{self.output}) in {dt:.1f}s: {self.images / dt:.2f} images/s, {self.tokens / dt:.1f} tokens/s"
                + after)
