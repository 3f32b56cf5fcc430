"""`phi3v batch` inputs and outputs (phi3v/batch_io.py): a folder, a glob, CSV, Parquet, JSONL and a saved Hugging
Face dataset give one record per input with the bad ones' errors in place, and the same answer for the same image
and question whatever the format; Parquet output resumes; `kill -9` of a real `phi3v batch` at random points, then
resume, leaves exactly one record per input with the answers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_common import CKPT, GOLD
from phi3v import batch_io
from phi3v.batch import run_batch
from phi3v.cli import _params, build_parser

IMG = GOLD / "images"
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Describe the image."
COMMON = ["--model", CKPT, "--device", "cpu", "--dtype", "fp32", "--max-tokens", "5", "--num-crops", "1",
          "--batch-size", "2", "--quiet"]


def _batch(llm, *args: str) -> dict[str, dict]:  # noqa: F811
    a = build_parser().parse_args(["batch", *COMMON, *args])
    assert run_batch(a, _params(a), lambda _a: llm) == 0
    recs = batch_io.read_records(a.output)
    assert len(recs) == len({r["id"] for r in recs}), "an id written twice"
    return {r["id"]: r for r in recs}


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    shutil.copy(IMG / "coffee.png", d / "coffee.png")
    shutil.copy(IMG / "astronaut.png", d / "sub" / "astronaut.png")
    (d / "sub" / "broken.jpg").write_bytes(b"not an image")
    (d / "notes.txt").write_text("not an image either: skipped by extension")
    return d


@pytest.fixture(scope="module")
def reference(llm, tmp_path_factory) -> dict[str, str]:  # noqa: F811
    """The answer to PROMPT for each golden image, from the folder job."""
    tmp = tmp_path_factory.mktemp("ref")
    recs = _batch(llm, "--input", str(_folder(tmp)), "--prompt", PROMPT, "--output", str(tmp / "out.jsonl"))
    assert set(recs) == {"coffee.png", "sub/astronaut.png", "sub/broken.jpg"}  # id = the relative path
    assert "not a recognised image format" in recs["sub/broken.jpg"]["error"]
    for r in (recs["coffee.png"], recs["sub/astronaut.png"]):
        assert r["usage"]["completion_tokens"] == 5 and r["finish_reason"] == "length" and r["timings"]["total_s"] > 0
    return {"coffee": recs["coffee.png"]["text"], "astronaut": recs["sub/astronaut.png"]["text"]}


def test_folder_matches_a_single_generate(llm, reference) -> None:  # noqa: F811
    from phi3v.sampling_params import SamplingParams

    solo = llm.generate(f"<|user|>\n<|image_1|>\n{PROMPT}<|end|>\n<|assistant|>\n", [str(IMG / "coffee.png")],
                        SamplingParams(max_tokens=5), num_crops=1)
    assert reference["coffee"] == solo.text


def test_glob_and_limit(llm, reference, tmp_path) -> None:  # noqa: F811
    d = _folder(tmp_path)
    recs = _batch(llm, "--input", str(d / "**" / "*.png"), "--prompt", PROMPT, "--output", str(tmp_path / "o.jsonl"),
                  "--limit", "1")
    assert recs == {"coffee.png": recs["coffee.png"]} and recs["coffee.png"]["text"] == reference["coffee"]
    recs = _batch(llm, "--input", str(d / "**" / "*.png"), "--prompt", PROMPT, "--output", str(tmp_path / "o.jsonl"))
    assert {k: r["text"] for k, r in recs.items()} == {"coffee.png": reference["coffee"],
                                                       "sub/astronaut.png": reference["astronaut"]}


def _rows() -> list[dict]:
    return [{"key": "k1", "question": PROMPT, "path": "coffee.png"},
            {"key": "k2", "question": PROMPT, "path": "missing.png"},
            {"key": "k3", "question": "", "path": "astronaut.png"},
            {"key": "k4", "question": PROMPT, "path": str(IMG / "astronaut.png")}]


def _check_rows(recs: dict[str, dict], reference: dict[str, str]) -> None:
    assert set(recs) == {"k1", "k2", "k3", "k4"}
    assert recs["k1"]["text"] == reference["coffee"] and recs["k4"]["text"] == reference["astronaut"]
    assert "missing.png" in recs["k2"]["error"] and "--prompt-column" in recs["k3"]["error"]


def test_csv_paths_relative_to_the_file(llm, reference, tmp_path) -> None:  # noqa: F811
    import csv

    for name in ("coffee.png", "astronaut.png"):
        shutil.copy(IMG / name, tmp_path / name)
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["key", "question", "path"])
        w.writeheader()
        w.writerows(_rows())
    recs = _batch(llm, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o.jsonl"),
                  "--image-column", "path", "--prompt-column", "question", "--id-column", "key")
    _check_rows(recs, reference)


def test_parquet_bytes_in_and_parquet_out_resumes(llm, reference, tmp_path) -> None:  # noqa: F811
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"image": (IMG / "coffee.png").read_bytes()}, {"image": b"garbage"}, {"image": None},
            {"image": (IMG / "astronaut.png").read_bytes()}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "o.parquet"
    args = ["--input", str(tmp_path / "in.parquet"), "--prompt", PROMPT, "--output", str(out)]
    first = _batch(llm, *args, "--limit", "2")
    assert set(first) == {"0", "1"} and not os.path.exists(str(out) + ".partial.jsonl")
    recs = _batch(llm, *args)  # resume: rows 0 and 1 are in the Parquet file already
    assert recs["0"] == first["0"] and recs["0"]["text"] == reference["coffee"]
    assert recs["3"]["text"] == reference["astronaut"] and "not a recognised image format" in recs["1"]["error"]
    assert recs["2"]["usage"]["prompt_tokens"] > 0  # no image: a text-only question
    assert pq.read_table(out).num_rows == 4


def test_saved_dataset_and_jsonl(llm, reference, tmp_path) -> None:  # noqa: F811
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": ["a", "b"], "img": [str(IMG / "coffee.png"), str(IMG / "astronaut.png")],
                                     "q": [PROMPT, PROMPT]}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    recs = _batch(llm, "--input", str(tmp_path / "ds"), "--output", str(tmp_path / "o.jsonl"), "--image-column", "img",
                  "--prompt-column", "q", "--id-column", "id")
    assert {k: r["text"] for k, r in recs.items()} == {"a": reference["coffee"], "b": reference["astronaut"]}
    lines = [json.dumps({"id": "x", "prompt": PROMPT, "images": ["coffee.png"]}), "{torn",
             json.dumps({"id": "y", "prompt": PROMPT, "images": ["nope.png"]})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    recs = _batch(llm, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "j.jsonl"),
                  "--image-dir", str(IMG))
    assert recs["x"]["text"] == reference["coffee"] and "invalid JSON" in recs["line-2"]["error"]
    assert "nope.png" in recs["y"]["error"]


@pytest.mark.parametrize("case", ["folder without --prompt", "empty glob", "missing csv", "--num-replicas alone"])
def test_bad_command_lines_are_one_line_and_exit_2(case, tmp_path, capsys) -> None:
    from phi3v.cli import main

    folder = str(_folder(tmp_path))
    args = {"folder without --prompt": ["--input", folder],
            "empty glob": ["--input", str(tmp_path / "*.webp"), "--prompt", "x"],
            "missing csv": ["--input", str(tmp_path / "nope.csv")],
            "--num-replicas alone": ["--input", folder, "--prompt", "x", "--num-replicas", "2"]}[case]
    assert main(["batch", *COMMON, "--output", str(tmp_path / "o.jsonl"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phi3v: error:") and "\n" not in err
    expect = {"folder without --prompt": "--prompt", "empty glob": "holds no image file", "missing csv": "nope.csv",
              "--num-replicas alone": "--ray"}[case]
    assert expect in err and not os.path.exists(tmp_path / "o.jsonl")


def test_kill_9_at_random_points_then_resume(llm, tmp_path) -> None:  # noqa: F811
    """A real `phi3v batch` killed three times while it writes, then run to the end: one record per input, the
    answers of an uninterrupted run."""
    d = tmp_path / "imgs"
    d.mkdir()
    names = ["coffee.png", "astronaut.png", "page_L.png", "logo_RGBA.png", "thin_10x500.png", "extreme_1000x2.png"]
    for i in range(24):
        shutil.copy(IMG / names[i % len(names)], d / f"{i:02d}_{names[i % len(names)]}")
    args = ["--input", str(d), "--prompt", PROMPT, "--max-tokens", "12"]
    want = {k: r["text"] for k, r in _batch(llm, *args, "--output", str(tmp_path / "whole.jsonl")).items()}
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "phi3v.cli", "batch", *COMMON, *args, "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(19)
    cut_at = []  # records in the output when each kill landed
    for _ in range(3):
        target = len(batch_io.read_records(str(out))) + rng.randint(1, 4)  # a random point of the output...
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while p.poll() is None and len(batch_io.read_records(str(out))) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # ... and a random moment after it
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            cut_at.append(len(batch_io.read_records(str(out))))
        p.wait()
    assert len(cut_at) == 3 and all(n < len(want) for n in cut_at), (cut_at, "make the job longer")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = batch_io.read_records(str(out))
    assert sorted(x["id"] for x in recs) == sorted(want)  # exactly one record per input
    assert {x["id"]: x["text"] for x in recs} == want


def test_a_torn_last_line_is_cut(tmp_path) -> None:
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')
    batch_io.cut_torn_tail(str(p))
    assert p.read_text() == '{"id": "a", "text": "x"}\n'
    batch_io.cut_torn_tail(str(p))  # a whole last line stays
    assert p.read_text() == '{"id": "a", "text": "x"}\n'
    p.write_text('{"id": "only", "te')
    batch_io.cut_torn_tail(str(p))
    assert p.read_text() == ""
