"""A new user's first run: a fast --help and --version, `python -m phi3v`, defaults in --help, one-line errors that
say what to do, SamplingParams passed positionally, seeds drawn from the OS, and the CPU thread rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v import LLM, SamplingParams
from phi3v.device import MIN_HIDDEN_FOR_THREADS, default_cpu_threads
from phi3v.hub import hub_error, resolve_model

ROOT = Path(__file__).resolve().parent.parent
CKPT = str(ROOT / "tests" / "data" / "tiny-phi3v")
PROMPT = "<|user|>\nTell me a story.<|end|>\n<|assistant|>\n"


def _py(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))


def test_help_and_version_do_not_import_torch() -> None:
    code = """
import sys
from phi3v.cli import main
for argv in (["--help"], ["--version"], ["run", "--help"], ["chat", "--help"], ["batch", "--help"],
             ["serve", "--help"], ["bench", "--help"], ["quantize", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in ("torch", "numpy", "PIL", "safetensors", "tokenizers") if m in sys.modules)
print("HEAVY", heavy)
"""
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    assert "phi3v 0.1.0 (torch " in r.stdout  # --version names phi3v's and PyTorch's versions


def test_python_dash_m_and_defaults_in_help() -> None:
    r = subprocess.run([sys.executable, "-m", "phi3v", "run", "--help"], capture_output=True, text=True, timeout=60,
                       cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.startswith("usage: phi3v run")
    text = " ".join(r.stdout.split())
    for shown in ("(default: 512)", "(default: 0.0)", "(default: 1.0)", "(default: 8)", "(default: none)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_offline_hub_error_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        resolve_model("microsoft/Phi-3-vision-128k-instruct")
    msg = str(e.value)
    assert "\n" not in msg and ".." not in msg and len(msg) < 250
    assert "--model FOLDER" in msg and "HF_HUB_OFFLINE" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    long = hub_error("a/b", RuntimeError("x" * 1000 + "."))
    assert len(long) < 400 and ".." not in long.replace("...", "") and "--model FOLDER" in long


def test_missing_extras_name_an_install_that_works() -> None:
    from phi3v.extras import install_hint

    hint = install_hint("serve")
    assert "pip install -e '.[serve]'" in hint and "not on PyPI" in hint
    sources = [p.read_text() for p in [*(ROOT / "phi3v").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]]
    assert not any("pip install 'phi3v[" in s or 'pip install "phi3v[' in s for s in sources)


def test_url_error_names_the_switch(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"allow_url_images=True.*--allow-url-images"):
        llm.generate("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", ["https://example.com/a.png"])


def test_sampling_params_in_the_place_of_images(llm: LLM) -> None:
    p = SamplingParams(max_tokens=5)
    msgs = [{"role": "user", "content": "Hello"}]
    assert len(llm.chat(msgs, p).token_ids) == 5
    streamed = "".join(llm.stream(msgs, p))
    assert streamed == llm.chat(msgs, p).text
    assert llm.generate(PROMPT, p).usage["completion_tokens"] == 5
    assert "".join(llm.stream(PROMPT, SamplingParams(max_tokens=3))) == llm.generate(PROMPT, images=None,
                                                                                     sampling_params=SamplingParams(max_tokens=3)).text
    with pytest.raises(TypeError, match="SamplingParams given twice"):
        list(llm.stream(msgs, p, p))


def test_unseeded_sampling_differs_seeded_repeats(llm: LLM) -> None:
    hot = SamplingParams(max_tokens=16, temperature=1.5, ignore_eos=True)
    runs = [llm.generate(PROMPT, hot).token_ids for _ in range(3)]
    assert len({tuple(r) for r in runs}) > 1  # 16 tokens at temperature 1.5: equal draws ~ never
    seeded = SamplingParams(max_tokens=16, temperature=1.5, ignore_eos=True, seed=7)
    assert llm.generate(PROMPT, seeded).token_ids == llm.generate(PROMPT, seeded).token_ids


def test_cpu_thread_rule() -> None:
    assert default_cpu_threads(64, 16) == 1 and default_cpu_threads(MIN_HIDDEN_FOR_THREADS - 1, 16) == 1
    assert default_cpu_threads(3072, 16) == 16 and default_cpu_threads(3072, 1) == 1
    with pytest.raises(ValueError, match="cpu_threads"):
        LLM(CKPT, device="cpu", cpu_threads=0)


def test_cpu_threads_applied_unless_the_user_chose(monkeypatch) -> None:
    import torch

    from phi3v.device import physical_cores, setup_cpu_threads

    saved, cores = torch.get_num_threads(), physical_cores()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # conftest's setting: the user's choice, see below
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(min(cores, os.cpu_count() or 1))  # PyTorch's untouched default
        assert setup_cpu_threads(None, 64) == 1 == torch.get_num_threads()  # the rule: tiny -> one thread
        # a full-size engine after a tiny one: the rule's own 1 is not taken for the user's choice
        assert setup_cpu_threads(None, 3072) == cores == torch.get_num_threads()  # full size -> every core
        torch.set_num_threads(cores + 2)  # the user's torch.set_num_threads: kept
        assert setup_cpu_threads(None, 64) == cores + 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", str(cores))  # the user's OMP_NUM_THREADS: kept
        torch.set_num_threads(cores)
        assert setup_cpu_threads(None, 64) == cores == torch.get_num_threads()
        LLM(CKPT, device="cpu", max_model_len=256, cpu_threads=3)  # an explicit cpu_threads wins; set by the engine
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)
