"""Shared helpers for the server tests: real uvicorn servers on 127.0.0.1 with the tiny checkpoint.

Servers are started once per test process (by name) in a daemon thread and stopped at exit; the
tests reach into `handle.frontend` / `handle.engine` to check internal state (KV slots, queues).
No test in this module.
"""

from __future__ import annotations

import atexit
import base64
import functools
import io
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import uvicorn  # noqa: E402

from phi3v.server.app import Settings, create_app  # noqa: E402
from phi3v.server.http_errors import http_protocol  # noqa: E402

ROOT = Path(__file__).resolve().parent
TINY = str(ROOT / "data" / "tiny-phi3v")
IMAGES = ROOT / "data" / "golden" / "images"
IMAGE_NAMES = ["astronaut.png", "coffee.png", "extreme_1000x2.png", "logo_RGBA.png", "page_L.png",
               "thin_10x500.png", "tiny_1x1.png"]
MODEL_ID = "tiny"
CTX = 4096
DEVICE = os.environ.get("PHI3V_TEST_DEVICE", "cpu")  # the server tests run on CPU; cuda for a GPU smoke run
# fp32 everywhere (TF32 off on CUDA): tests compare a request's tokens across batch compositions, which
# bf16 rounding on a random tiny model would not keep
DTYPE = "fp32"
if DEVICE.startswith("cuda"):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def allowed_mismatches(n: int) -> int:
    """Outputs that may differ from the one-at-a-time reference among n requests. CPU: none (fp32 math
    here does not depend on the batch). CUDA: the GEMMs' accumulation order changes with the batch
    size (cuBLAS, the small-M GEMV), and a random tiny model has near-tied logits, so a few greedy
    tokens flip; up to 10 % of the requests."""
    return max(1, n // 10) if DEVICE.startswith("cuda") else 0


@dataclass
class ServerHandle:
    url: str
    app: Any
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def frontend(self) -> Any:
        return self.app.state.phi3v.frontend

    @property
    def engine(self) -> Any:
        return self.frontend.engine

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


_servers: dict[str, ServerHandle] = {}
_lock = threading.Lock()


def start_server(name: str, *, before_start: Any = None, wait: bool = True, **overrides: Any) -> ServerHandle:
    """A running server (cached by name) with the tiny checkpoint on CPU; waits for /health == 200.
    `before_start(app)` may patch the app first; wait=False returns once the socket listens."""
    with _lock:
        if name in _servers:
            return _servers[name]
        kw: dict[str, Any] = dict(model=TINY, served_model_name=MODEL_ID, device=DEVICE, dtype=DTYPE, max_model_len=CTX,
                                  max_num_seqs=16, max_queue=512, max_images_per_request=4)
        kw.update(overrides)
        settings = Settings(**kw)
        app = create_app(settings)
        if before_start is not None:
            before_start(app)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                               timeout_graceful_shutdown=2, http=http_protocol()))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{name}")
        thread.start()
        h = ServerHandle(f"http://127.0.0.1:{port}", app, settings, server, thread)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(h.url + "/health", timeout=5).status_code in ((200,) if wait else (200, 503)):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"server {name} did not become healthy")
            time.sleep(0.1)
        _servers[name] = h
        atexit.register(h.stop)
        return h


@functools.lru_cache(maxsize=1)
def reference_llm() -> Any:
    """An LLM of its own (the server's engine belongs to the server thread) for expected outputs."""
    from phi3v.api import LLM

    return LLM(TINY, device=DEVICE, dtype=DTYPE, max_num_seqs=16, max_model_len=CTX)


def expected(messages: list[dict[str, Any]], max_tokens: int, num_crops: int | None = 1, **sp: Any) -> Any:
    """The synchronous API's greedy Completion for the same request (images: same sources)."""
    from phi3v.sampling_params import SamplingParams

    return reference_llm().chat(messages, SamplingParams(max_tokens=max_tokens, temperature=0.0, **sp),
                                num_crops=num_crops)


def expected_many(reqs: list[tuple[list[dict[str, Any]], int]], num_crops: int | None = 1) -> list[Any]:
    """Greedy Completions for many requests, batched by the synchronous API (results in input order)."""
    from phi3v.sampling_params import SamplingParams

    llm = reference_llm()
    prepared = [llm.prepare_chat(m, SamplingParams(max_tokens=mt, temperature=0.0), num_crops) for m, mt in reqs]
    return llm.generate_many(prepared)


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    iu: dict[str, Any] = {"url": url}
    if detail:
        iu["detail"] = detail
    return {"type": "image_url", "image_url": iu}


def user(text: str, *urls: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [image_part(u) for u in urls] + [{"type": "text", "text": text}]}]


def chat_body(messages: list[dict[str, Any]], max_tokens: int = 6, **kw: Any) -> dict[str, Any]:
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "num_crops": 1}
    body.update(kw)
    return body


def assert_openai_error(r: httpx.Response, status: int | tuple[int, ...] | None = None) -> dict[str, Any]:
    """A 4xx (or the given status) whose body is {"error": {"message", "type", "param", "code"}}."""
    if status is None:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    else:
        allowed = status if isinstance(status, tuple) else (status,)
        assert r.status_code in allowed, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "Traceback" not in r.text and 'File "' not in r.text and "validation error for" not in r.text
    return err


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample in /metrics (0.0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def wait_idle(h: ServerHandle, timeout: float = 30.0) -> None:
    """Until no request is accepted, running or waiting (KV slots all free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fe = h.frontend
        if fe.active == 0 and h.engine.num_running == 0 and h.engine.num_waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"server not idle: active={h.frontend.active} running={h.engine.num_running} "
                         f"waiting={h.engine.num_waiting}")


def sse_events(lines: list[str]) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
