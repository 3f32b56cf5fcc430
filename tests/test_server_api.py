"""`phi3v serve` with the real `openai` client: chat, streaming, images, usage, parity with LLM.chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_harness import (IMAGES, MODEL_ID, TINY, assert_openai_error, chat_body, data_uri, expected,
                            image_bytes, image_part, metric, start_server, user, wait_idle)

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)


def _create(client, messages, max_tokens=8, **kw):
    return client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body={"num_crops": 1}, **kw)


def test_health_models_and_request_id(srv):
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    models = openai.OpenAI(base_url=srv.base_url, api_key="x").models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    r = httpx.post(srv.base_url + "/chat/completions", json=chat_body(user("hi"), max_tokens=2))
    assert r.status_code == 200 and r.json()["id"].startswith("chatcmpl-")
    assert r.headers["x-request-id"] == r.json()["id"]


def test_non_stream_base64_image_equals_llm_chat(client):
    messages = user("What is in this picture?", data_uri(image_bytes("coffee.png")))
    resp = _create(client, messages, max_tokens=10)
    want = expected(messages, 10)
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == want.finish_reason
    assert resp.usage.prompt_tokens == want.usage["prompt_tokens"] > 144  # the image's tokens count
    assert resp.usage.completion_tokens == want.usage["completion_tokens"] == 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == MODEL_ID and resp.id.startswith("chatcmpl-")


def test_stream_equals_non_stream_with_usage(client):
    messages = [{"role": "system", "content": "You are terse."}]
    messages += user("Describe it.", data_uri(image_bytes("astronaut.png")))
    want = expected(messages, 12)
    chunks = list(_create(client, messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == want.usage["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == want.usage["completion_tokens"]
    assert len({c.id for c in chunks}) == 1
    # without include_usage no usage chunk
    chunks = list(_create(client, messages, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_local_path_and_file_uri(client):
    path = str(IMAGES / "page_L.png")
    for src in (path, "file://" + path):
        messages = user("Read the page.", src)
        resp = _create(client, messages, max_tokens=6)
        want = expected(messages, 6)
        assert resp.choices[0].message.content == want.text
        assert resp.usage.prompt_tokens == want.usage["prompt_tokens"]


def test_two_images_in_one_message(client):
    messages = user("Compare the two images.", data_uri(image_bytes("logo_RGBA.png")), str(IMAGES / "thin_10x500.png"))
    resp = _create(client, messages, max_tokens=8)
    want = expected(messages, 8)
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == want.usage["prompt_tokens"]
    one = _create(client, user("Compare the two images.", data_uri(image_bytes("logo_RGBA.png"))), max_tokens=1)
    assert resp.usage.prompt_tokens > one.usage.prompt_tokens + 100


def test_multi_turn_and_string_content(client):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Tell me more."}]
    resp = _create(client, messages, max_tokens=7)
    assert resp.choices[0].message.content == expected(messages, 7).text


def test_detail_low_means_one_crop(srv):
    src = data_uri(image_bytes("astronaut.png"))
    def usage(**part_kw):
        body = chat_body([{"role": "user", "content": [image_part(src, **part_kw), {"type": "text", "text": "x"}]}],
                         max_tokens=1)
        body.pop("num_crops")
        r = httpx.post(srv.base_url + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]
    low, auto, high = usage(detail="low"), usage(), usage(detail="high")
    want_low = expected(user("x", src), 1, num_crops=1).usage["prompt_tokens"]
    want_default = expected(user("x", src), 1, num_crops=None).usage["prompt_tokens"]
    assert low == want_low and auto == high == want_default > low


def test_stop_seed_and_max_completion_tokens(srv, client):
    messages = user("Count.")
    full = expected(messages, 12)
    stop = full.text[3:6]
    resp = _create(client, messages, max_tokens=12, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == full.text[: full.text.index(stop)]
    r = httpx.post(srv.base_url + "/chat/completions", timeout=60,
                   json=chat_body(messages, max_tokens=50, max_completion_tokens=3))
    assert r.json()["usage"]["completion_tokens"] == 3
    a, b = (client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=1.0, seed=11)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logprobs(client):
    resp = _create(client, user("hi"), max_tokens=4, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 for t in content)


def test_response_format_structured_output(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    messages = user("Is it a cat?", data_uri(image_bytes("coffee.png")))
    resp = _create(client, messages, max_tokens=40,
                   response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(resp.choices[0].message.content)["answer"] in ("yes", "no")
    assert resp.choices[0].message.content == expected(messages, 40, json_schema=schema).text
    resp = _create(client, user("JSON please"), max_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError):
        _create(client, user("x"), response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                                       "schema": {"type": "bogus"}}})


def test_metrics(srv, client):
    before = metric(srv.url, "phi3v_generation_tokens_total")
    _create(client, user("metrics please"), max_tokens=5)
    wait_idle(srv)
    assert metric(srv.url, "phi3v_generation_tokens_total") - before == 5
    for name in ("phi3v_requests_total", "phi3v_prompt_tokens_total", "phi3v_time_to_first_token_seconds_count",
                 "phi3v_generation_tokens_per_second", "phi3v_num_requests_running", "phi3v_num_requests_waiting",
                 "phi3v_kv_cache_usage_ratio"):
        assert name in httpx.get(srv.url + "/metrics").text, name
    assert metric(srv.url, "phi3v_time_to_first_token_seconds_count") >= 1
    assert metric(srv.url, "phi3v_num_requests_running") == 0


def test_health_is_503_while_loading_then_200():
    gate = threading.Event()

    def slow_load(app) -> None:
        state = app.state.phi3v
        load = state.load
        state.load = lambda: (gate.wait(60), load())
    h = start_server("slow", before_start=slow_load, wait=False, max_num_seqs=2)
    r = httpx.get(h.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = httpx.post(h.base_url + "/chat/completions", json=chat_body(user("hi")))
    assert assert_openai_error(r, 503)["code"] == "model_not_ready" and r.headers["retry-after"]
    assert httpx.get(h.base_url + "/models").status_code == 200  # the id is known before the weights
    gate.set()
    deadline = time.monotonic() + 60
    while httpx.get(h.url + "/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.post(h.base_url + "/chat/completions", json=chat_body(user("hi"), max_tokens=2)).status_code == 200


def test_load_failure_reports_error():
    h = start_server("broken", wait=False, model="/nonexistent/model/folder")
    deadline = time.monotonic() + 30
    while httpx.get(h.url + "/health").json()["status"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.get(h.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "error" and "Traceback" not in r.text
    assert_openai_error(httpx.post(h.base_url + "/chat/completions", json=chat_body(user("hi"))), 503)


def test_api_key():
    h = start_server("auth", api_key="sekret", max_num_seqs=2)
    bad = openai.OpenAI(base_url=h.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(h.base_url + "/chat/completions", json=chat_body(user("hi")))
    assert_openai_error(r, 401)
    good = openai.OpenAI(base_url=h.base_url, api_key="sekret", max_retries=0)
    assert good.chat.completions.create(model=MODEL_ID, messages=user("hi"), max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(h.url + "/health").status_code == 200  # health stays open for probes


@pytest.mark.slow
def test_cli_serve_reads_env(tmp_path):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PHI3V_MODEL=TINY, PHI3V_PORT=str(port), PHI3V_DEVICE="cpu",
               PHI3V_SERVED_MODEL_NAME="envname", PHI3V_API_KEY="k", PHI3V_MAX_MODEL_LEN="1024",
               PHI3V_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "phi3v.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        url, deadline, saw_503 = f"http://127.0.0.1:{port}", time.monotonic() + 90, False
        while time.monotonic() < deadline:
            try:
                r = httpx.get(url + "/health", timeout=2)
                saw_503 |= r.status_code == 503
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "envname" and models["data"][0]["max_model_len"] == 1024
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)
