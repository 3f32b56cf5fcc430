"""What the GPU tests share: fp32 matmuls without TF32 (the tiny checkpoint's greedy tokens are compared
exactly), and a report of what each test measured.

Every module here is marked `gpu`: without CUDA the root conftest skips it ("needs CUDA"). On the GPU
machine: `python -m pytest -m gpu tests/gpu` (add `-s` to see the reports; set PHI3V_GPU_OUT=<folder>
to also write each as <folder>/<test>.json, as the scripts' --out did).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 math as the reference computes it: TF32 off for cuBLAS and cuDNN during the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], None]:
    """report(result): prints the result as JSON (shown with -s) and writes it to $PHI3V_GPU_OUT/<test>.json
    when that variable names a folder. Tests report before they assert, so a failure's numbers are kept."""

    def emit(res: dict[str, Any]) -> None:
        res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **res}
        text = json.dumps(res, indent=1)
        print(text)
        out = os.environ.get("PHI3V_GPU_OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / (re.sub(r"[^\w.-]+", "_", request.node.name) + ".json")).write_text(text, encoding="utf-8")

    return emit
