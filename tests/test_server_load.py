"""Concurrency: 200+ mixed requests at once, disconnects, a full queue, and failures that stay contained."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from phi3v.prepare import ImageMemo

from server_harness import (IMAGE_NAMES, IMAGES, allowed_mismatches, assert_openai_error, chat_body, data_uri,
                            expected, expected_many, image_bytes, metric, png, start_server, user, wait_idle)

WORDS = "the quick brown fox jumps over a lazy dog while seven zebras quietly graze near old oak trees".split()


def _mixed(n: int) -> list[tuple[list, int, bool]]:
    """n requests: 0-2 images (base64 or path), prompt lengths 2..20 words, max_tokens 2..8, some streamed."""
    out = []
    for i in range(n):
        srcs = []
        for j in range(i % 3):
            name = IMAGE_NAMES[(i * 3 + j) % len(IMAGE_NAMES)]
            srcs.append(data_uri(image_bytes(name)) if (i + j) % 2 else str(IMAGES / name))
        text = f"Request {i}: " + " ".join(WORDS[(i * 7 + m) % len(WORDS)] for m in range(i % 19))
        out.append((user(text, *srcs), 2 + i % 7, i % 4 == 0))
    return out


async def _one(client: httpx.AsyncClient, url: str, messages: list, max_tokens: int, stream: bool) -> dict:
    body = chat_body(messages, max_tokens=max_tokens, stream=stream,
                     stream_options={"include_usage": True} if stream else None)
    if not stream:
        r = await client.post(url, json=body)
        assert r.status_code == 200, r.text
        j = r.json()
        return {"text": j["choices"][0]["message"]["content"], "finish": j["choices"][0]["finish_reason"],
                "usage": j["usage"], "id": j["id"]}
    text, finish, usage, ids = "", None, None, set()
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"error": ev["error"], "finish": None}
            ids.add(ev["id"])
            if ev["choices"]:
                text += ev["choices"][0]["delta"].get("content") or ""
                finish = ev["choices"][0]["finish_reason"] or finish
            if ev.get("usage"):
                usage = ev["usage"]
    assert len(ids) == 1
    return {"text": text, "finish": finish, "usage": usage, "id": ids.pop()}


def _gather(url: str, reqs: list[tuple[list, int, bool]]) -> list:
    async def main() -> list:
        limits = httpx.Limits(max_connections=len(reqs) + 10, max_keepalive_connections=len(reqs) + 10)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(_one(client, url, *r) for r in reqs), return_exceptions=True)
    return asyncio.run(main())


@pytest.mark.slow
def test_220_concurrent_mixed_requests_all_correct(srv):
    reqs = _mixed(220)
    want = expected_many([(m, mt) for m, mt, _ in reqs])
    checked = range(0, len(reqs), 20)  # the batched reference agrees with one-at-a-time LLM.chat
    singles = {i: expected(reqs[i][0], reqs[i][1]) for i in checked}
    def counts(u: dict) -> tuple:  # cached_tokens depends on what ran before: the counts do not
        return u["prompt_tokens"], u["completion_tokens"]

    differ = [i for i in checked if (singles[i].text, counts(singles[i].usage)) != (want[i].text, counts(want[i].usage))]
    assert len(differ) <= allowed_mismatches(len(checked)), differ
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], srv.engine.num_running)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    got = _gather(srv.base_url + "/chat/completions", reqs)
    elapsed = time.perf_counter() - t0
    stop.set()
    errors = [g for g in got if isinstance(g, BaseException)]
    assert not errors, errors[:3]
    differ = [i for i, (g, w) in enumerate(zip(got, want)) if g["text"] != w.text]
    assert len(differ) <= allowed_mismatches(len(reqs)), [(i, got[i]["text"], want[i].text) for i in differ[:5]]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["usage"]["prompt_tokens"] == w.usage["prompt_tokens"], i
        if i not in differ:
            assert g["finish"] == w.finish_reason, i
            assert g["usage"]["completion_tokens"] == w.usage["completion_tokens"], i
    assert len({g["id"] for g in got}) == len(reqs)
    assert peak[0] > 1, "the engine never batched requests"
    print(f"220 concurrent requests in {elapsed:.1f}s, peak batch {peak[0]}")
    wait_idle(srv)
    assert not srv.frontend._handles and srv.frontend.active == 0
    assert len(srv.engine.runner.images.cache) <= srv.engine.runner.images.size
    for name in ("phi3v_num_requests_running", "phi3v_num_requests_waiting", "phi3v_kv_cache_usage_ratio",
                 "phi3v_kv_cache_tokens_used"):
        assert metric(srv.url, name) == 0, name


def _wait_running(srv, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while srv.engine.num_running != n:
        assert time.monotonic() < deadline, f"num_running={srv.engine.num_running}, expected {n}"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_kv(srv):
    wait_idle(srv)
    aborted = metric(srv.url, "phi3v_requests_total", outcome="aborted")
    gen = metric(srv.url, "phi3v_generation_tokens_total")
    body = chat_body(user("Tell a very long story."), max_tokens=3000, ignore_eos=True, stream=True)
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.base_url + "/chat/completions", json=body) as r:
        lines, n = r.iter_lines(), 0
        while n < 4:  # (leaving a for-loop over iter_lines would already close the response)
            n += next(lines).startswith("data: ")
        assert srv.engine.num_running == 1 and metric(srv.url, "phi3v_kv_cache_usage_ratio") > 0
    _wait_running(srv, 0)
    wait_idle(srv)
    assert metric(srv.url, "phi3v_requests_total", outcome="aborted") == aborted + 1
    assert metric(srv.url, "phi3v_generation_tokens_total") - gen < 3000
    assert metric(srv.url, "phi3v_kv_cache_usage_ratio") == 0 and metric(srv.url, "phi3v_kv_cache_tokens_used") == 0


def test_disconnect_while_waiting_for_non_stream_reply(srv):
    wait_idle(srv)
    aborted = metric(srv.url, "phi3v_requests_total", outcome="aborted")
    body = chat_body(user("Another long story."), max_tokens=3000, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base_url + "/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    _wait_running(srv, 0)
    wait_idle(srv)
    assert metric(srv.url, "phi3v_requests_total", outcome="aborted") == aborted + 1


def test_full_queue_answers_429_with_retry_after():
    small = start_server("small", max_num_seqs=1, max_queue=1)
    reqs = [(user(f"story {i}"), 150, False) for i in range(8)]

    async def main() -> list:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(small.base_url + "/chat/completions",
                                                      json=chat_body(m, max_tokens=mt, ignore_eos=True))
                                          for m, mt, _ in reqs))
    rs = asyncio.run(main())
    full = [r for r in rs if r.status_code == 429]
    ok = [r for r in rs if r.status_code == 200]
    assert len(full) + len(ok) == len(rs) and full and ok, [r.status_code for r in rs]
    for r in full:
        assert assert_openai_error(r, 429)["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
    assert all(r.json()["usage"]["completion_tokens"] == 150 for r in ok)
    assert httpx.get(small.url + "/health").status_code == 200
    wait_idle(small)
    assert metric(small.url, "phi3v_requests_total", outcome="rejected") == len(full)


def _is_poison(crops) -> bool:
    """The uniform pure-red POISON image (normalised R ~ +1.93, G ~ -1.75); not merely a reddish one such
    as tiny_1x1.png (200, 30, 90), which a good request may carry."""
    g = crops[0]
    return float(g.flatten(1).std(dim=1).max()) < 1e-4 and float(g[0, 0, 0]) > 1.9 and float(g[1, 0, 0]) < -1.7


POISON = png(64, 64, (255, 0, 0))


def _gate(fe, n: int) -> None:
    """Make the engine thread wait (once) until n requests are queued, so they are admitted together."""
    orig = fe._step

    def gated() -> None:
        deadline = time.monotonic() + 10
        while len(fe.engine.sched.waiting) < n and time.monotonic() < deadline:
            fe._drain(block=False)
            time.sleep(0.01)
        fe._step = orig
        orig()
    fe._step = gated


@pytest.mark.parametrize("where", ["vision", "preprocess"])
def test_a_failing_request_fails_alone(srv, where):
    wait_idle(srv)
    good = _mixed(9)[1:]
    bad = [(user("poison A", data_uri(POISON)), 4, False), (user("poison B", data_uri(POISON)), 4, True)]
    fe, model = srv.frontend, srv.frontend.llm.model
    proc = fe.llm.image_processor
    # an engine failure is the server's (500, "error"); an unexpected exception in preparation is blamed on the
    # request's input (400, "invalid"), logged with its traceback
    outcome = "error" if where == "vision" else "invalid"
    errors0 = metric(srv.url, "phi3v_requests_total", outcome=outcome)
    if where == "vision":
        orig = model.encode_images

        def encode(crops_list, sizes, **kw):
            if any(_is_poison(c) for c in crops_list):
                raise RuntimeError("injected vision failure")
            return orig(crops_list, sizes, **kw)
        model.encode_images = encode
        _gate(fe, len(good) + len(bad))
    else:
        fe.llm.preparer.memo = ImageMemo()  # (else the poison image, served by the vision case, skips preprocessing)
        orig = proc.preprocess

        def preprocess(img, *a, **k):
            if img.size == (64, 64) and img.getpixel((0, 0))[:3] == (255, 0, 0):
                raise RuntimeError("injected preprocessing failure")
            return orig(img, *a, **k)
        proc.preprocess = preprocess
    try:
        reqs = good[:4] + bad[:1] + good[4:] + bad[1:]
        got = _gather(srv.base_url + "/chat/completions", reqs)
    finally:
        if where == "vision":
            del model.encode_images
        else:
            del proc.preprocess
    differ = 0
    for (m, mt, stream), g in zip(reqs, got):
        if m in [b[0] for b in bad]:
            assert isinstance(g, (AssertionError, httpx.HTTPError)) or g["finish"] is None, g
        else:
            assert not isinstance(g, BaseException), g
            w = expected(m, mt)
            differ += (g["text"], g["usage"]["completion_tokens"]) != (w.text, w.usage["completion_tokens"])
    assert differ <= allowed_mismatches(len(good)), differ
    r = httpx.post(srv.base_url + "/chat/completions", json=chat_body(bad[0][0], max_tokens=2), timeout=60)
    assert r.status_code == 200, r.text  # the server recovered; the image itself is fine
    wait_idle(srv)
    assert metric(srv.url, "phi3v_requests_total", outcome=outcome) - errors0 == len(bad)
    assert httpx.get(srv.url + "/health").status_code == 200


def test_failed_request_error_shape(srv):
    """A non-stream request that fails inside the engine gets a 500 in the OpenAI shape, no traceback."""
    model = srv.frontend.llm.model
    orig = model.encode_images

    def encode(crops_list, sizes):
        raise RuntimeError("secret internal detail")
    model.encode_images = encode
    try:
        r = httpx.post(srv.base_url + "/chat/completions", json=chat_body(user("x", data_uri(png(33, 17)))), timeout=60)
    finally:
        del model.encode_images
    assert orig is not None
    err = assert_openai_error(r, 500)
    assert err["type"] == "server_error" and "secret" not in r.text
