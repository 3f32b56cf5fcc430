"""What the whole suite shares: the tiny checkpoint's and the golden data's paths, one CPU LLM on the tiny
checkpoint, the main test server, and the markers.

Markers (registered in pyproject.toml; pytest runs with --strict-markers):
  slow         a test that takes over ~1.5 s on a quiet 2-core machine; `-m "not slow"` for a quick run
  interpreter  Triton kernels run on the CPU by Triton's interpreter, in a subprocess (tests/interp.py)
  gpu          needs CUDA (tests/gpu/); skipped here when CUDA is absent, run on the GPU machine with
               `python -m pytest -m gpu tests/gpu`

Helper modules (engine_common.py, server_harness.py, interp.py) are not named test_*: pytest collects
no tests from them, and the test modules import them by name (this folder is on sys.path).
"""

from __future__ import annotations

import os

# One CPU thread per test process (and the CLI, server and interpreter subprocesses it starts) unless set: the tiny
# model's ops gain nothing from a second thread, and on a shared machine an OpenMP thread that waits for a busy
# core holds up every op.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from engine_common import CKPT, GOLD

from phi3v import LLM


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a gpu test: run it on the GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """tests/data/golden: the reference's outputs (manifest.json, model/*.npz, images/)."""
    return GOLD


@pytest.fixture(scope="session")
def tiny_ckpt() -> str:
    """The tiny random checkpoint in the exact Hugging Face layout (tests/data/tiny-phi3v)."""
    return CKPT


@pytest.fixture(scope="session")
def llm() -> LLM:
    """One fp32 CPU LLM on the tiny checkpoint for every test module that needs no other configuration (a
    module that does, e.g. an fp8 KV cache, defines its own `llm`). 6 sequences: fewer than some engine
    tests' requests, so that those wait for a slot; 4096 tokens."""
    return LLM(CKPT, device="cpu", dtype="fp32", max_num_seqs=6, max_model_len=4096)


@pytest.fixture
def kv_memory_is_free(llm: LLM):
    """After the test: the shared LLM's engine holds no request and no KV block (a run-ahead step still in
    flight is drained first). The engine test modules use it for every test."""
    yield
    eng = llm.engine
    eng.step()
    assert not eng.has_unfinished() and eng._ahead is None
    assert eng.sched.all_free and not eng.sched.seqs


@pytest.fixture(scope="session")
def srv():
    """The main test server (uvicorn on 127.0.0.1, tiny checkpoint, URL images on, local paths under the
    golden images), started once per test process; test_server_schema runs its own."""
    from server_harness import IMAGES, start_server  # skips when the serve extras are absent

    return start_server("main", allow_url_images=True, allowed_media_dir=str(IMAGES))
