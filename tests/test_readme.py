"""The README's Python snippets, run as written on the tiny checkpoint.

Every ```python block of README.md runs, in order, in one namespace (as a reader would paste them into one
session), in a folder holding the files they name (cover.jpg, a.png, b.png, photo.png: golden test images;
clip.mp4: a small generated video; receipts-lora, charts-lora: random PEFT adapters for the tiny checkpoint). The only substitution:
the Hugging Face model ids become the tiny checkpoint's folder (in a block that talks to a server through the
`openai` client: the test server's model id, and its address for http://127.0.0.1:8000).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CKPT = str(ROOT / "tests" / "data" / "tiny-phi3v")
IMAGES = ROOT / "tests" / "data" / "golden" / "images"
MODEL_IDS = ("microsoft/Phi-3-vision-128k-instruct", "microsoft/Phi-3.5-vision-instruct")
FILES = {"cover.jpg": "page_L.png", "a.png": "coffee.png", "b.png": "astronaut.png", "photo.png": "logo_RGBA.png"}


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def substitute(code: str, server_url: str, server_model: str) -> str:
    client = "OpenAI(" in code
    for mid in MODEL_IDS:
        code = code.replace(f'"{mid}"', repr(server_model if client else CKPT))
    return code.replace("http://127.0.0.1:8000", server_url)  # the test server's http://HOST:PORT


def test_readme_has_the_snippets_this_test_expects() -> None:
    code = "\n".join(snippets())
    assert "LLM(" in code and "llm.stream(" in code and "OpenAI(" in code and "json_schema=" in code


@pytest.mark.slow
def test_readme_python_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, srv, capsys) -> None:
    from server_harness import MODEL_ID

    from lora_common import random_layers, write_adapter
    from test_video import make_video

    for name, src in FILES.items():
        shutil.copyfile(IMAGES / src, tmp_path / name)
    (tmp_path / "clip.mp4").write_bytes(make_video())
    for seed, name in enumerate(("receipts-lora", "charts-lora")):
        write_adapter(str(tmp_path / name), random_layers(["qkv_proj", "down_proj"], 4, seed), 4, 8,
                      ["qkv_proj", "down_proj"])
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    for i, code in enumerate(snippets()):
        try:
            exec(compile(substitute(code, srv.url, MODEL_ID), f"README.md python block {i + 1}", "exec"), ns)
        except Exception as e:  # noqa: BLE001 - name the block that failed
            pytest.fail(f"README python block {i + 1} failed: {type(e).__name__}: {e}\n{code}")
    out = capsys.readouterr().out
    assert out  # the snippets print their answers
