"""`phi3v batch` keeps going whatever one line does (issue 18): poison lines become their error records, a torn
last line left by a crash is cut off before anything is appended, duplicate ids are error lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from phi3v.batch_io import cut_torn_tail as repair_tail
from phi3v.cli import main

from image_mutants import decoder_mutant

DATA = Path(__file__).parent / "data"
IMG = DATA / "golden" / "images"
CKPT = str(DATA / "tiny-phi3v")


def _avif_mutant() -> bytes:
    """An AVIF file Pillow opens but whose decode raises RuntimeError."""
    return decoder_mutant("AVIF", ("RuntimeError",))


def test_repair_tail(tmp_path) -> None:
    p = tmp_path / "o.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "b", "te')
    assert repair_tail(str(p)) == len(b'{"id": "b", "te')
    assert p.read_bytes() == b'{"id": "a"}\n'
    assert repair_tail(str(p)) == 0
    p.write_bytes(b'{"id": "no newline at all')
    repair_tail(str(p))
    assert p.read_bytes() == b""


def test_poison_lines_torn_output_and_duplicates(capsys, tmp_path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(IMG / "coffee.png", imgs / "coffee.png")
    (imgs / "poison.avif").write_bytes(_avif_mutant())
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "Describe.", "images": ["coffee.png"], "num_crops": 1}),
        json.dumps({"id": "avif", "prompt": "Describe.", "images": ["poison.avif"]}),
        json.dumps({"id": "surrogate", "prompt": "hi \ud800 there"}),  # json.dumps writes the \\ud800 escape
        json.dumps({"id": "sys", "messages": [{"role": "system", "content": "\udfff"},
                                              {"role": "user", "content": "x"}]}),
        json.dumps({"id": "badparam", "prompt": "hi", "max_tokens": "many"}),
        json.dumps({"id": "a", "prompt": "Again."}),  # duplicate of line 1
        json.dumps({"id": "torn", "prompt": "Say something.", "max_tokens": 3}),
    ]
    inp.write_text("\n".join(lines) + "\n")
    out.write_text(json.dumps({"id": "old", "text": "kept"}) + "\n" + '{"id": "torn", "text": "half wri')
    args = ["batch", "--model", CKPT, "--device", "cpu", "--max-tokens", "4", "--input", str(inp),
            "--output", str(out), "--image-dir", str(imgs), "--fsync-interval", "0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "torn last line" in err and "2 done, 5 failed" in err
    recs = [json.loads(x) for x in out.read_text().splitlines()]  # every line whole: nothing glued to a fragment
    by_id = {r["id"]: r for r in recs if "line" not in r}
    assert set(by_id) == {"old", "a", "avif", "surrogate", "sys", "badparam", "torn"}
    assert "text" in by_id["a"] and by_id["torn"]["usage"]["completion_tokens"] == 3
    assert "decoded" in by_id["avif"]["error"]
    assert "surrogate" in by_id["surrogate"]["error"] and "surrogate" in by_id["sys"]["error"]
    assert by_id["badparam"]["error"]
    dups = [r for r in recs if "line" in r]
    assert len(dups) == 1 and dups[0]["id"] == "a" and dups[0]["line"] == 6 and "line 1" in dups[0]["error"]
    n = len(recs)
    assert main(args) == 0  # resume: nothing runs again, the duplicate is not reported twice
    assert "0 done, 0 failed, 6 skipped" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == n
