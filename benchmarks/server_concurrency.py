"""(g) server concurrency: N streaming chat requests at once, none with `max_tokens`, against a real `phi3v serve`
(a subprocess, as users start it) through the real `openai` client. Each request's answer is cut short by stop
strings; without `max_tokens` a request may run to the end of the context, so an engine that reserved KV for
that up front would admit only a few at a time. Reports how many ran at once (the server's
`phi3v_num_requests_running`, sampled while the requests are in flight), time to first token per request,
the whole run's time, and whether every request finished with its stop string.

Usage: python benchmarks/server_concurrency.py [--model DIR] [--device cpu|cuda] [--n 200] [--image]
       [--max-model-len 8192] [--json OUT]
Defaults to the tiny test checkpoint on the CPU (a functional run); on the GPU pass the full-size folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parent.parent
STOP = ["."]  # random weights: answers of some tens of tokens, so that the requests overlap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "phi3v", "serve", "--model", a.model, "--port", str(port), "--device", a.device,
           "--max-num-seqs", str(a.n), "--max-queue", str(2 * a.n), "--max-model-len", str(a.max_model_len),
           "--no-web-ui", "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + a.start_timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"phi3v serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("phi3v serve did not come up in time")


def gauge(metrics: str, what: str) -> float:
    """phi3v_num_requests_{what} from a /metrics page (-1 if absent)."""
    m = re.search(rf"^phi3v_num_requests_{what}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", metrics, re.M)
    return float(m.group(1)) if m else -1.0


async def one(client: AsyncOpenAI, model: str, i: int, image: str | None) -> dict:
    content: list[dict] = [{"type": "text", "text": f"Request {i}: say something."}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    t0 = time.perf_counter()
    first, text, finish, chunks = None, "", None, 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                  stream=True, stop=STOP, temperature=0.0)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
            chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "total_s": end - t0, "first_at": first or end, "end_at": end, "chunks": chunks,
            "finish": finish, "chars": len(text)}


async def run(a: argparse.Namespace, port: int) -> dict:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    image = None
    if a.image:
        from base64 import b64encode
        from io import BytesIO

        from phi3v.bench import noise_image

        buf = BytesIO()
        noise_image(336, 336, 0).save(buf, "PNG")
        image = "data:image/png;base64," + b64encode(buf.getvalue()).decode()
    peak, waiting, samples = 0.0, 0.0, 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak, waiting, samples
        async with httpx.AsyncClient() as h:
            while not done.is_set():
                text = (await h.get(f"http://127.0.0.1:{port}/metrics")).text
                peak, waiting = max(peak, gauge(text, "running")), max(waiting, gauge(text, "waiting"))
                samples += 1
                await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(client, model, i, image) for i in range(a.n)), return_exceptions=True)
    wall = time.perf_counter() - t0
    done.set()
    await sampler
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    ttft = sorted(r["ttft_s"] for r in ok)
    first_end = min((r["end_at"] for r in ok), default=0.0)
    tokens = sorted(r["chunks"] for r in ok)
    return {"n": a.n, "completed": len(ok), "errors": errors[:5], "finish_stop": sum(r["finish"] == "stop" for r in ok),
            "peak_running": peak, "peak_waiting": waiting, "metric_samples": samples, "wall_s": round(wall, 3),
            # streaming before any request had finished: admitted together, not one reservation after another
            "first_token_before_any_finished": sum(r["first_at"] <= first_end for r in ok),
            "answer_chunks_median": statistics.median(tokens) if tokens else None,
            "ttft_median_s": round(statistics.median(ttft), 4) if ttft else None,
            "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 4) if ttft else None,
            "ttft_max_s": round(ttft[-1], 4) if ttft else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "tests/data/tiny-phi3v"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--image", action="store_true", help="each request carries one small image (a data URI)")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    port = free_port()
    proc = start_server(a, port)
    try:
        res = asyncio.run(run(a, port))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    res.update(device=a.device, model=a.model, date=time.strftime("%Y-%m-%d"), image=a.image)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0 if res["completed"] == a.n and not res["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
