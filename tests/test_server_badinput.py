"""The bad-input corpus: every bad request is a 4xx in the OpenAI error shape and the server lives on.

URL cases run with URL images enabled but only ever name loopback / private / link-local literals;
a listener on 127.0.0.1 checks that the refusals happen before any connection is made.
"""

from __future__ import annotations

import socket
import struct
import zlib

import httpx
import pytest

from server_harness import (IMAGES, MODEL_ID, assert_openai_error, chat_body, data_uri, image_bytes, png, user,
                            wait_idle)


@pytest.fixture(scope="module")
def listener():
    """A TCP listener on 127.0.0.1 that no image fetch may ever reach."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def _bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _img(src: str) -> dict:
    return chat_body(user("What is this?", src))


CORRUPT = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
TRUNCATED = image_bytes("coffee.png")[: len(image_bytes("coffee.png")) * 6 // 10]

# (id, json body | raw bytes, expected status)
CASES = [
    ("corrupt_image", _img(data_uri(CORRUPT)), 400),
    ("truncated_image", _img(data_uri(TRUNCATED)), 400),
    ("zero_byte_image", _img("data:image/png;base64,"), 400),
    ("zero_byte_file_uri", _img("data:image/png;base64,="), 400),
    ("decompression_bomb", _img(data_uri(_bomb_png())), 400),
    ("bomb_under_pillow_limit", _img(data_uri(_bomb_png(12_000, 12_000))), 400),
    ("invalid_base64", _img("data:image/png;base64,!!!not*base64!!!"), 400),
    ("not_an_image_mime", _img("data:text/plain;base64,aGVsbG8="), 400),
    ("scheme_ftp", _img("ftp://127.0.0.1/a.png"), 400),
    ("scheme_gopher", _img("gopher://127.0.0.1:70/x"), 400),
    ("scheme_javascript", _img("javascript://alert(1)"), 400),
    ("path_outside_dir", _img("/etc/passwd"), 400),
    ("file_uri_outside_dir", _img("file:///etc/hostname"), 400),
    ("path_traversal", _img(str(IMAGES / ".." / ".." / "data" / "tiny-phi3v" / "config.json")), 400),
    ("missing_file", _img(str(IMAGES / "nope.png")), 400),
    ("dir_as_image", _img(str(IMAGES)), 400),
    ("more_tags_than_images", chat_body([{"role": "user", "content": "<|image_1|>\n<|image_2|>\nWhat?"}]), 400),
    ("tags_mixed_with_parts", chat_body([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes("tiny_1x1.png"))}},
        {"type": "text", "text": "<|image_2|> and this?"}]}, {"role": "user", "content": "<|image_2|>"}]), 400),
    ("too_many_images", _img(data_uri(image_bytes("tiny_1x1.png"))) | {"messages": user(
        "many", *[data_uri(image_bytes("tiny_1x1.png"))] * 5)}, 400),
    ("prompt_over_context", chat_body(user("hello " * 5000)), 400),
    ("bad_json", b"{not json", 400),
    ("empty_body", b"", 400),
    ("json_array", b"[1, 2]", 400),
    ("messages_string", chat_body("hi"), 400),
    ("messages_empty", chat_body([]), 400),
    ("max_tokens_string", chat_body(user("hi"), max_tokens="ten"), 400),
    ("max_tokens_zero", chat_body(user("hi"), max_tokens=0), 400),
    ("max_tokens_float", chat_body(user("hi"), max_tokens=2.5), 400),
    ("temperature_string", chat_body(user("hi"), temperature="hot"), 400),
    ("temperature_negative", chat_body(user("hi"), temperature=-1), 400),
    ("top_p_zero", chat_body(user("hi"), top_p=0), 400),
    ("stream_string", chat_body(user("hi"), stream="yes"), 400),
    ("n_zero", chat_body(user("hi"), n=0), 400),
    ("n_over_max_num_seqs", chat_body(user("hi"), n=100), 400),
    ("seed_string", chat_body(user("hi"), seed="1"), 400),
    ("seed_over_int64", chat_body(user("hi"), seed=2**64, temperature=1.0), 400),
    ("top_k_huge", chat_body(user("hi"), top_k=2**63, temperature=1.0), 400),
    ("stop_number", chat_body(user("hi"), stop=5), 400),
    ("stop_empty_string", chat_body(user("hi"), stop=[""]), 400),
    ("content_number", chat_body([{"role": "user", "content": 5}]), 400),
    ("role_unknown", chat_body([{"role": "wizard", "content": "hi"}]), 400),
    ("role_missing", chat_body([{"content": "hi"}]), 400),
    ("part_type_unknown", chat_body([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400),
    ("image_url_missing_url", chat_body([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400),
    ("image_url_not_object", chat_body([{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]), 400),
    ("detail_unknown", chat_body([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,", "detail": "ultra"}}]}]), 400),
    ("num_crops_zero", chat_body(user("hi"), num_crops=0), 400),
    ("top_logprobs_without_logprobs", chat_body(user("hi"), top_logprobs=2), 400),
    ("presence_penalty_over_2", chat_body(user("hi"), presence_penalty=2.5), 400),
    ("frequency_penalty_string", chat_body(user("hi"), frequency_penalty="1"), 400),
    ("logit_bias_over_100", chat_body(user("hi"), logit_bias={"5": 101}), 400),
    ("logit_bias_past_vocab", chat_body(user("hi"), logit_bias={"99999999": 1}), 400),
    ("unknown_field", chat_body(user("hi"), best_of=2), 400),
    ("unknown_model", chat_body(user("hi"), model="gpt-4o"), 404),
    ("model_missing", {k: v for k, v in chat_body(user("hi")).items() if k != "model"}, 400),
]


@pytest.mark.parametrize("body,status", [pytest.param(b, s, id=i) for i, b, s in CASES])
def test_bad_input_is_4xx_and_server_survives(srv, body, status):
    url = srv.base_url + "/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url, json=body, timeout=60)
    err = assert_openai_error(r, status)
    assert len(err["message"]) < 1000  # one-line messages, no echoed base64 blobs
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254", "[::1]", "10.0.0.1", "192.168.1.1", "0.0.0.0",
                                  "224.0.0.1", "100.64.0.1", "[::ffff:127.0.0.1]", "2130706433"])
def test_url_to_non_public_address_is_refused_before_connecting(srv, listener, host):
    port = listener.getsockname()[1]
    for url in (f"http://{host}:{port}/img.png", f"https://{host}:{port}/img.png"):
        r = httpx.post(srv.base_url + "/chat/completions", json=_img(url), timeout=60)
        err = assert_openai_error(r, 400)
        assert "public" in err["message"] or "resolve" in err["message"], err
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected
    assert httpx.get(srv.url + "/health").status_code == 200


def test_streaming_bad_input_fails_before_the_stream(srv):
    r = httpx.post(srv.base_url + "/chat/completions", json=_img(data_uri(CORRUPT)) | {"stream": True}, timeout=60)
    assert_openai_error(r, 400)


def test_other_http_errors_are_openai_shaped(srv):
    assert_openai_error(httpx.get(srv.url + "/v1/nope"), 404)
    assert_openai_error(httpx.get(srv.base_url + "/chat/completions"), 405)
    assert_openai_error(httpx.post(srv.base_url + "/chat/completions", content=b"model=x",
                                   headers={"content-type": "application/x-www-form-urlencoded"}), 400)
    big = b'{"model": "' + b"x" * (srv.settings.max_body_bytes + 1) + b'"}'
    assert_openai_error(httpx.post(srv.base_url + "/chat/completions", content=big,
                                   headers={"content-type": "application/json"}, timeout=60), 413)


@pytest.mark.parametrize("name,data", [("1x1", image_bytes("tiny_1x1.png")), ("10000x10", png(10000, 10)),
                                       ("10x10000", png(10, 10000)), ("1000x2", image_bytes("extreme_1000x2.png"))])
@pytest.mark.parametrize("crops", [1, None])
def test_extreme_sizes_succeed(srv, name, data, crops):
    body = _img(data_uri(data))
    if crops is None:
        body.pop("num_crops")
    r = httpx.post(srv.base_url + "/chat/completions", json=body | {"max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_metrics_count_invalid_and_server_idle(srv):
    wait_idle(srv)
    text = httpx.get(srv.url + "/metrics").text
    assert 'outcome="invalid"' in text
    assert srv.engine.num_running == 0 and srv.frontend.active == 0
    assert MODEL_ID in text
