"""The seed's three jobs through the CLI and the API, and every bad input giving a clear error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from phi3v import LLM, SamplingParams
from phi3v.cli import main

DATA = Path(__file__).parent / "data"
IMG = DATA / "golden" / "images"
CKPT = str(DATA / "tiny-phi3v")
BASE = ["--model", CKPT, "--device", "cpu", "--max-tokens", "12", "--num-crops", "2"]


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


JOBS = [
    ("Describe this image.", [IMG / "astronaut.png"]),
    ("What is the title of this book? Read the text.", [IMG / "page_L.png"]),
    ("Compare the two images. What differs?", [IMG / "coffee.png", IMG / "logo_RGBA.png"]),
]


@pytest.mark.parametrize("prompt,images", JOBS, ids=["describe", "ocr", "compare"])
def test_seed_jobs_cli_json_equals_api(capsys, llm: LLM, prompt: str, images: list[Path]) -> None:
    args = ["run", *BASE, "--json", *[a for i in images for a in ("--image", str(i))], prompt]
    code, out, err = _run(capsys, args)
    assert code == 0, err
    got = json.loads(out)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(i)} for i in images] +
             [{"type": "text", "text": prompt}]}]
    ref = llm.chat(msgs, SamplingParams(max_tokens=12), num_crops=2)
    assert got["token_ids"] == ref.token_ids and got["text"] == ref.text
    assert got["usage"]["prompt_tokens"] == ref.usage["prompt_tokens"] > 313 * len(images)
    assert set(got["timings"]) >= {"ttft_s", "total_s"}


def test_run_streams_text_to_stdout(capsys, llm: LLM) -> None:
    code, out, err = _run(capsys, ["run", *BASE, "--image", str(IMG / "astronaut.png"), "Describe this image."])
    assert code == 0, err
    ref = llm.chat([{"role": "user", "content": [{"type": "image", "image": str(IMG / "astronaut.png")},
                                                  {"type": "text", "text": "Describe this image."}]}],
                   SamplingParams(max_tokens=12), num_crops=2)
    assert out == ref.text + "\n"


def test_chat_multi_turn_with_image_command(monkeypatch, capsys) -> None:
    script = f"/image {IMG / 'coffee.png'}\nWhat is this?\n/image /no/such.png\nAnd now?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = _run(capsys, ["chat", *BASE])
    assert code == 0
    assert "image 1 attached" in err and "no such image file" in err
    assert out.count("\n") == 2  # two answers, one line each


@pytest.mark.slow
def test_installed_entry_point_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "phi3v.cli", "run", *BASE, "--json", "--image", str(IMG / "tiny_1x1.png"),
                        "Describe."], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 12


# ---------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    png = (IMG / "astronaut.png").read_bytes()
    files = {"missing": str(d / "nope.png"), "text": str(d / "notes.png"), "empty": str(d / "empty.png"),
             "truncated": str(d / "trunc.png"), "bomb": str(d / "bomb.png"), "dir": str(d)}
    Path(files["text"]).write_text("this is not an image\n")
    Path(files["empty"]).write_bytes(b"")
    Path(files["truncated"]).write_bytes(png[: len(png) // 3])
    Image.new("1", (9000, 9000)).save(files["bomb"])  # 81 Mpx: over the 64 Mpx limit, a few KB on disk
    return files


@pytest.mark.parametrize("kind,pattern", [("missing", "no such|not found|does not exist"), ("text", "not an image|identify|image file"),
                                          ("empty", "empty|0 bytes|zero"), ("truncated", "truncated|corrupt|broken|decode"),
                                          ("bomb", "pixels|too large|bomb"), ("dir", "directory|not a file")])
def test_bad_image_files(llm: LLM, bad_files, capsys, kind: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=f"(?i){pattern}"):
        llm.generate("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", [bad_files[kind]])
    code, out, err = _run(capsys, ["run", *BASE, "--image", bad_files[kind], "Hi"])
    assert code == 2 and out == ""
    assert err.startswith("phi3v: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("prompt,n_images,pattern", [
    ("<|user|>\n<|image_2|>\nHi<|end|>\n<|assistant|>\n", 1, "image_2"),
    ("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", 2, "image_2|2 images"),
    ("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", 0, "image_1|0 images|no image"),
    ("<|user|>\n<|image_0|>\nHi<|end|>\n<|assistant|>\n", 1, "image_0"),
])
def test_mismatched_image_tags(llm: LLM, prompt: str, n_images: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=f"(?i){pattern}"):
        llm.generate(prompt, [str(IMG / "astronaut.png")] * n_images)


def test_prompt_longer_than_context(capsys) -> None:
    small = LLM(CKPT, device="cpu", max_model_len=600)
    with pytest.raises(ValueError, match="context holds 600"):
        small.generate("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", [str(IMG / "astronaut.png")], num_crops=4)
    with pytest.raises(ValueError, match="context holds 600"):
        small.generate("<|user|>\n" + "word " * 700 + "<|end|>\n<|assistant|>\n")
    # the engine still works after the refusals
    assert small.generate("<|user|>\nHi<|end|>\n<|assistant|>\n", sampling_params=SamplingParams(max_tokens=3)).usage[
        "completion_tokens"] == 3


@pytest.mark.parametrize("args,pattern", [
    (["--temperature", "-1"], "temperature"), (["--max-tokens", "0"], "max_tokens"), (["--num-crops", "0"], "num_crops"),
    (["--dtype", "fp8"], "dtype"), (["--device", "tpu"], "device"), (["--top-p", "0"], "top_p"),
    (["--kv-cache-dtype", "int4"], "kv_cache_dtype"),
])
def test_bad_parameters_one_line_error(capsys, args: list[str], pattern: str) -> None:
    code, out, err = _run(capsys, ["run", "--model", CKPT, "--device", "cpu", *args, "--image", str(IMG / "tiny_1x1.png"), "Hi"]
                          if "--device" not in args else ["run", "--model", CKPT, *args, "Hi"])
    assert code == 2 and err.count("\n") == 1 and pattern in err


def test_bad_model_paths(capsys, tmp_path) -> None:
    code, _, err = _run(capsys, ["run", "--model", str(tmp_path), "--device", "cpu", "Hi"])
    assert code == 2 and "config.json" in err
    code, _, err = _run(capsys, ["run", "--model", "./does/not/exist", "--device", "cpu", "Hi"])
    assert code == 2 and "neither a checkpoint folder" in err
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        code, _, err = _run(capsys, ["run", "--model", "microsoft/Phi-3-vision-128k-instruct", "--device", "cpu", "Hi"])
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert code == 2 and "not in the local Hugging Face cache" in err and "--model FOLDER" in err and err.count("\n") == 1


def test_checkpoint_missing_weights_lists_keys(tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    for f in Path(CKPT).iterdir():
        shutil.copy(f, tmp_path / f.name)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("model.norm.weight")
    sd["model.extra.weight"] = sd["lm_head.weight"][:2].clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        LLM(str(tmp_path), device="cpu")
    assert "model.norm.weight" in str(e.value) and "model.extra.weight" in str(e.value)


@pytest.mark.slow
def test_bench_command_runs_end_to_end_on_cpu(capsys, tmp_path) -> None:
    out = tmp_path / "bench.json"
    code, stdout, err = _run(capsys, ["bench", "--model", CKPT, "--device", "cpu", "--decode-tokens", "3",
                                      "--n-offline", "2", "--offline-tokens", "2", "--max-num-seqs", "2",
                                      "--max-model-len", "4096", "--json-out", str(out)])
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["a_prompt_tokens"] > 2509 and res["a_decode_tok_s"] > 0
    assert res["b_ttft_ms_16crop"] > 0 and res["b_ttft_ms_4crop"] > 0
    assert res["c_offline_4crop_images_per_s"] > 0 and json.loads(stdout) == res


def test_bench_offline_part_alone_with_the_prefill_profile(capsys, tmp_path) -> None:
    out = tmp_path / "bench.json"
    code, _stdout, err = _run(capsys, ["bench", "--model", CKPT, "--device", "cpu", "--parts", "c", "--n-offline", "3",
                                       "--offline-tokens", "2", "--max-num-seqs", "3", "--prep-workers", "0",
                                       "--profile-prefill", "--max-model-len", "4096", "--kv-cache-dtype", "fp8",
                                       "--json-out", str(out)])
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["kv_cache_dtype"] == "fp8"
    assert not any(k.startswith(("a_", "b_")) for k in res)
    ph = res["c_offline_16crop_phases"]
    assert ph["prefill_steps"] >= 1 and ph["decode_steps"] >= 1 and ph["vision_s"] > 0 and ph["decoder_prefill_s"] > 0
    assert ph["vision_s"] + ph["embeds_s"] + ph["decoder_prefill_s"] <= ph["prefill_s"] + 1e-6


def test_bench_follow_up_part_alone(capsys, tmp_path) -> None:
    """(e): the follow-up and the second turn come from the caches (the image memo: its preparation is reported)."""
    out = tmp_path / "bench.json"
    code, _stdout, err = _run(capsys, ["bench", "--model", CKPT, "--device", "cpu", "--parts", "e",
                                       "--max-model-len", "8192", "--json-out", str(out)])
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["e_follow_up_ttft_ms"] > 0 and res["e_second_turn_ttft_ms"] > 0
    assert res["e_second_turn_cached_fraction"] > 0.9 and 0 < res["e_follow_up_prepare_ms"] < res["e_follow_up_ttft_ms"]


def test_batch_job_records_bad_lines_and_resumes(capsys, llm: LLM, tmp_path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": "a", "prompt": "Describe.", "images": ["astronaut.png"], "num_crops": 1}),
             "{not json",
             json.dumps({"id": "b", "prompt": "Read it.", "images": ["missing.png"]}),
             json.dumps({"id": "c", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}),
             json.dumps({"id": "d", "prompt": "Compare.", "images": ["coffee.png", "page_L.png"], "num_crops": 1})]
    inp.write_text("\n".join(lines) + "\n")
    args = ["batch", "--model", CKPT, "--device", "cpu", "--max-tokens", "6", "--input", str(inp), "--output", str(out),
            "--image-dir", str(IMG), "--batch-size", "2"]
    code, _, err = _run(capsys, args)
    assert code == 0, err
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"a", "line-2", "b", "c", "d"}
    assert "invalid JSON" in recs["line-2"]["error"] and "missing.png" in recs["b"]["error"]
    assert recs["c"]["usage"]["completion_tokens"] == 4 and recs["a"]["usage"]["completion_tokens"] == 6
    solo = llm.generate("<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n", [str(IMG / "astronaut.png")],
                        SamplingParams(max_tokens=6), num_crops=1)
    assert recs["a"]["text"] == solo.text
    code, _, err = _run(capsys, args)  # resume: everything already there is skipped
    assert code == 0 and "0 done" in err and "5 skipped" in err
    assert len(out.read_text().splitlines()) == 5
