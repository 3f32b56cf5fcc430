"""The chat page at / in a real headless Chromium, against a live server with the tiny checkpoint:
attachments, streamed multi-turn answers, Stop (the request is freed on the server), screenshots.

Errors, the API key and safe rendering of model output are in test_webui_errors.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from server_harness import IMAGES, MODEL_ID, TINY, assert_openai_error, data_uri, image_bytes, metric, start_server
from server_harness import wait_idle
from webui_harness import browser, srv  # noqa: F401 - fixtures
from webui_harness import FORCED, ForcedReply, Page, chrome, js_errors, screenshot, sse_reply, viewport, wait_for

from phi3v.server import webui
from phi3v.server.app import Settings, create_app


@pytest.fixture
def page(browser, srv):
    viewport(browser, 1280, 900)
    FORCED.clear()
    p = Page(browser, srv.url).open()
    yield p
    FORCED.clear()
    assert not js_errors(browser)


def _answer(srv, messages, max_tokens: int) -> str:
    """The server's greedy answer to the same conversation (what the page must show)."""
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "num_crops": 1}
    r = httpx.post(srv.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_page_and_assets_served_with_a_strict_policy(srv):
    r = httpx.get(srv.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert 'src="ui/app.js"' in r.text and "http" not in r.text.split("<body>")[0]  # no external assets
    for name, kind in (("app.js", "text/javascript"), ("chat.js", "text/javascript"),
                       ("markdown.js", "text/javascript"), ("view.js", "text/javascript"), ("style.css", "text/css")):
        got = httpx.get(f"{srv.url}/ui/{name}")
        assert got.status_code == 200 and got.headers["content-type"].startswith(kind) and got.content, name
        assert "://" not in got.text.replace("https?:\\/\\/", ""), name  # nothing fetched from elsewhere
    static = Path(webui.__file__).parent / "static"
    assert sorted(p.name for p in static.iterdir()) == sorted(webui._FILES)  # every shipped file is served
    for bad in ("/ui/webui.py", "/ui/index.html", "/ui/..%2Fapp.py", "/ui/"):
        assert_openai_error(httpx.get(srv.url + bad), 404)
    assert "/" not in srv.app.openapi()["paths"]  # the API schema (and its fuzzing) stays the API's


def test_no_web_ui_turns_it_off(monkeypatch):
    from fastapi.testclient import TestClient

    from phi3v.cli import build_parser

    client = TestClient(create_app(Settings(model=TINY, web_ui=False)))  # no `with`: the model is not loaded
    assert_openai_error(client.get("/"), 404)
    assert_openai_error(client.get("/ui/app.js"), 404)
    assert client.get("/metrics").status_code == 200
    assert build_parser().parse_args(["serve"]).no_web_ui is False
    assert build_parser().parse_args(["serve", "--no-web-ui"]).no_web_ui is True
    monkeypatch.setenv("PHI3V_NO_WEB_UI", "1")
    assert build_parser().parse_args(["serve"]).no_web_ui is True


def test_two_images_streamed_then_a_second_turn(page, srv, browser):
    from selenium.webdriver.common.keys import Keys

    page.settings(num_crops=1, max_tokens=16)
    page.attach(IMAGES / "coffee.png", IMAGES / "astronaut.png", IMAGES / "page_L.png")
    wait_for(lambda: len(page.qa("#thumbs .thumb img")) == 3, what="three thumbnails")
    page.q('#thumbs button[aria-label="Remove page_L.png"]').click()
    assert [t.get_attribute("alt") for t in page.qa("#thumbs img")] == ["coffee.png", "astronaut.png"]

    box = page.q("#prompt")
    box.send_keys("What is in these pictures?", Keys.SHIFT, Keys.ENTER)  # Shift+Enter: a new line, not sent
    assert page.answers() == [] and box.get_attribute("value").endswith("\n")
    page.record_stream()
    box.send_keys("Answer briefly.", Keys.ENTER)
    first = page.wait_answer(1)
    streamed = {n for state, n in page.recorded() if state == "streaming" and n > 0}
    assert len(streamed) >= 2, page.recorded()  # text grew in steps before the answer finished
    assert "16 tokens" in first.find_element("css selector", ".status").text
    turn1 = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes("coffee.png"))}},
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes("astronaut.png"))}},
        {"type": "text", "text": "What is in these pictures?\nAnswer briefly."}]}
    want1 = _answer(srv, [turn1], 16)
    assert page.copy(1) == want1
    assert page.qa("#thumbs .thumb") == [] and box.get_attribute("value") == ""
    sent = page.q(".msg.user")
    assert len(sent.find_elements("css selector", "img")) == 2
    assert sent.find_element("css selector", ".text").text == "What is in these pictures?\nAnswer briefly."

    page.ask("And which one is brighter?")
    page.wait_answer(2)
    turn2 = {"role": "user", "content": [{"type": "text", "text": "And which one is brighter?"}]}
    assert page.copy(2) == _answer(srv, [turn1, {"role": "assistant", "content": want1}, turn2], 16)

    screenshot(browser, "webui-1280.png")
    viewport(browser, 390, 844)
    time.sleep(0.2)
    assert page.js("return document.scrollingElement.scrollWidth") <= 390  # nothing sticks out sideways
    screenshot(browser, "webui-390.png")
    page.js("window.scrollTo(0, 0)")
    page.q("#settings-toggle").click()
    screenshot(browser, "webui-390-settings.png")

    page.q("#new-chat").click()
    assert page.answers() == [] and page.q("#empty").is_displayed()


def test_stop_frees_the_request_on_the_server(page, srv):
    from selenium.webdriver.common.keys import Keys

    wait_idle(srv)
    aborted = metric(srv.url, "phi3v_requests_total", outcome="aborted")
    gen = metric(srv.url, "phi3v_generation_tokens_total")
    page.settings(num_crops=1, max_tokens=3000)  # minutes of CPU decoding if nothing stopped it
    for n, how in ((1, "button"), (2, "escape")):
        page.ask(f"Tell a very long story, number {n}.")
        wait_for(lambda: metric(srv.url, "phi3v_num_requests_running") == 1 and page.answers()[-1].text.strip(),
                 what="the request running on the server, text on the page")
        if how == "button":
            page.q("#stop").click()
        else:
            page.q("#prompt").send_keys(Keys.ESCAPE)
        wait_for(lambda: metric(srv.url, "phi3v_num_requests_running") == 0 and srv.frontend.active == 0, 10,
                 "the server to drop the request")
        assert metric(srv.url, "phi3v_requests_total", outcome="aborted") == aborted + n
        answer = page.wait_answer(n, ("stopped",), timeout=5)
        assert answer.find_element("css selector", ".md").text.strip()  # the partial answer stays
        assert page.q("#send").is_displayed() and not page.q("#stop").is_displayed()
    wait_idle(srv)
    assert metric(srv.url, "phi3v_generation_tokens_total") - gen < 1000
    assert metric(srv.url, "phi3v_kv_cache_usage_ratio") == 0


def test_settings_shape_the_request(page):
    from selenium.webdriver.common.keys import Keys

    page.settings(num_crops=2, max_tokens=33, temperature=0.7, schema='{"type": "object", "properties": {')
    page.ask("Caption it.")
    error = wait_for(lambda: page.q("#settings-error").text, what="the schema error")
    assert "not valid JSON" in error and page.q("#settings").is_displayed() and page.answers() == []
    schema = {"type": "object", "properties": {"caption": {"type": "string"}}, "required": ["caption"]}
    page.settings(schema=json.dumps(schema))
    FORCED["response"] = sse_reply(['{"caption": ', '"a cup"}'], MODEL_ID)
    page.q("#prompt").send_keys(Keys.ENTER)
    page.wait_answer(1)
    assert not page.q("#settings-error").is_displayed()
    turn1 = {"role": "user", "content": [{"type": "text", "text": "Caption it."}]}
    assert FORCED.pop("request") == {
        "model": MODEL_ID, "messages": [turn1], "num_crops": 2, "max_tokens": 33, "temperature": 0.7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        "stream": True, "stream_options": {"include_usage": True}}
    page.open(fresh=False)  # settings survive a reload; the conversation does not
    assert page.answers() == [] and page.q("#max-tokens").get_attribute("value") == "33"
    page.settings(schema="")
    FORCED["response"] = sse_reply(["ok"], MODEL_ID)
    page.ask("Again")
    page.wait_answer(1)
    assert "response_format" not in FORCED.pop("request")
