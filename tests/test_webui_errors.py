"""The chat page in a real headless Chromium: errors shown in the page (a corrupt image, a prompt too
long, 429, a missing or wrong API key), attachments by drop and paste, and model output rendered as
text, never as HTML (the page's own Markdown renderer, fed through its real streaming code)."""

from __future__ import annotations

import base64

import httpx
import pytest

from server_harness import MODEL_ID, assert_openai_error, data_uri, png, start_server, wait_idle
from webui_harness import browser, srv  # noqa: F401 - fixtures
from webui_harness import FORCED, ForcedReply, Page, chrome, js_errors, sse_reply, viewport, wait_for


@pytest.fixture
def page(browser, srv):
    FORCED.clear()
    viewport(browser, 1280, 900)
    p = Page(browser, srv.url).open()
    yield p
    FORCED.clear()
    assert not js_errors(browser)


def _error_of_answer(page, n: int = 1) -> str:
    answer = page.wait_answer(n, ("error",), timeout=30)
    return answer.find_element("css selector", ".error").text


def test_corrupt_image_shows_the_servers_message(page, srv, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not the rest of a PNG " * 8)
    page.settings(num_crops=1, max_tokens=4)
    page.attach(bad)
    wait_for(lambda: page.qa("#thumbs .thumb.broken"), what="the thumbnail marked as not previewable")
    page.ask("What is this?")
    shown = _error_of_answer(page)
    content = [{"type": "image_url", "image_url": {"url": data_uri(bad.read_bytes())}},
               {"type": "text", "text": "What is this?"}]
    body = {"model": MODEL_ID, "max_tokens": 4, "temperature": 0, "num_crops": 1,
            "messages": [{"role": "user", "content": content}]}
    said = assert_openai_error(httpx.post(srv.base_url + "/chat/completions", json=body, timeout=30), 400)["message"]
    assert said in shown and "HTTP 400" in shown
    # nothing was answered: the message is back in the box to fix and resend
    assert page.q("#prompt").get_attribute("value") == "What is this?" and len(page.qa("#thumbs .thumb")) == 1
    wait_idle(srv)


def test_prompt_too_long_and_busy_server(page, srv):
    page.settings(max_tokens=4)
    page.js("const p = document.getElementById('prompt'); p.value = 'hello '.repeat(6000);")
    page.ask("end")
    shown = _error_of_answer(page)
    assert "HTTP 400" in shown and "context" in shown, shown

    fe = srv.frontend
    capacity, fe.capacity = fe.capacity, 0  # the real route's QueueFull path: 429 with Retry-After
    try:
        page.q("#prompt").clear()
        page.ask("Are you busy?")
        shown = _error_of_answer(page, 2)
    finally:
        fe.capacity = capacity
    assert "HTTP 429" in shown and "busy" in shown and "try again in 1 s" in shown, shown


def test_api_key_missing_wrong_then_right(browser):
    from selenium.webdriver.common.keys import Keys

    keyed = start_server("webui-key", api_key="open sesame", max_num_seqs=2)
    viewport(browser, 1280, 900)
    page = Page(browser, keyed.url).open()
    banner = wait_for(lambda: page.q("#banner").is_displayed() and page.q("#banner").text, what="the key banner")
    assert "HTTP 401" in banner and "API key" in banner
    page.ask("hello?")
    assert "HTTP 401" in wait_for(lambda: page.q("#composer-error").text, what="the composer's error")
    assert page.answers() == [] and page.q("#prompt").get_attribute("value") == "hello?"  # nothing lost

    page.settings(api_key="open says me", num_crops=1, max_tokens=4)
    wait_for(lambda: "HTTP 401" in page.q("#banner").text, what="the wrong key refused")
    page.q("#prompt").send_keys(" Again?")  # editing the message clears the old error
    assert not page.q("#composer-error").is_displayed()
    page.q("#prompt").send_keys(Keys.ENTER)
    wait_for(lambda: "HTTP 401" in page.q("#composer-error").text and page.answers() == [], what="refused again")

    page.settings(api_key="open sesame")
    wait_for(lambda: not page.q("#banner").is_displayed() and page.q("#model").text == MODEL_ID,
             what="the model id once the key is right")
    page.q("#prompt").send_keys(Keys.ENTER)
    page.wait_answer(1)
    assert not page.q("#composer-error").is_displayed()
    page.open(fresh=False)  # the key is remembered by this browser
    assert page.q("#api-key").get_attribute("value") == "open sesame"
    wait_for(lambda: page.q("#model").text == MODEL_ID, what="the model id with the stored key")
    assert not js_errors(browser)


EVIL = ("# Title <script>window.__pwned = 1</script>\n"
        "Text with <img src=x onerror=\"window.__pwned = 2\"> and <b>a tag</b> and **real bold**.\n\n"
        "- item <iframe src=\"javascript:window.__pwned = 3\"></iframe>\n"
        "- [a link](javascript:window.__pwned=4) and [ok](https://example.com/docs)\n\n"
        "```html\n<script>window.__pwned = 5</script>\n```\n")


def test_model_output_is_shown_as_text_never_as_html(page):
    FORCED["response"] = sse_reply([EVIL[i:i + 7] for i in range(0, len(EVIL), 7)], MODEL_ID)  # tags split
    page.ask("Say something dangerous.")
    answer = page.wait_answer(1)
    md = answer.find_element("css selector", ".md")
    assert md.find_elements("css selector", "script, img, iframe, b, [onerror]") == []
    assert page.js("return window.__pwned") is None
    text = md.text
    assert "Title <script>window.__pwned = 1</script>" in text
    assert 'Text with <img src=x onerror="window.__pwned = 2"> and <b>a tag</b> and real bold.' in text
    assert "[a link](javascript:window.__pwned=4)" in text
    assert [a.get_attribute("href") for a in md.find_elements("css selector", "a")] == ["https://example.com/docs"]
    assert md.find_element("css selector", "strong").text == "real bold"
    assert md.find_element("css selector", "pre code").text == "<script>window.__pwned = 5</script>"
    assert page.copy(1) == EVIL


MARKDOWN = [
    ("a *b* `c<d>` **e**", "<p>a <em>b</em> <code>c&lt;d&gt;</code> <strong>e</strong></p>"),
    ("1. x\n2. y\n   more", "<ol><li>x</li><li>y<br>more</li></ol>"),
    ("- one\n* two", "<ul><li>one</li><li>two</li></ul>"),
    ("```py\nx<1 &", '<pre><code data-lang="py">x&lt;1 &amp;</code></pre>'),  # still streaming: no closing fence
    ("> q\n\nline1\nline2", "<blockquote><p>q</p></blockquote><p>line1<br>line2</p>"),
    ("## H ##\n---", "<h4>H</h4><hr>"),
    ("snake_case_name and _it_", "<p>snake_case_name and <em>it</em></p>"),
    ("[x](data:text/html,hi) [y](http://a.b/?q=1&r=2)",
     '<p>[x](data:text/html,hi) <a href="http://a.b/?q=1&amp;r=2" target="_blank" '
     'rel="noopener noreferrer nofollow">y</a></p>'),
]


def test_markdown_renderer_builds_nodes(page):
    got = page.d.execute_async_script("""
        const [cases, done] = arguments;
        import('./ui/markdown.js').then(({renderMarkdown}) => done(cases.map(([src]) => {
          const div = document.createElement('div');
          renderMarkdown(div, src);
          return div.innerHTML;
        })));""", MARKDOWN)
    assert got == [html for _, html in MARKDOWN]


def test_drop_and_paste_attach_images(page):
    from selenium.webdriver.common.keys import Keys

    result = page.js("""
        const [b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const files = (...list) => { const dt = new DataTransfer(); list.forEach((f) => dt.items.add(f)); return dt; };
        const dropped = files(new File([bytes], 'dropped.png', {type: 'image/png'}),
                              new File(['plain words'], 'notes.txt', {type: 'text/plain'}));
        const log = document.getElementById('log');
        log.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dropped, bubbles: true}));
        const overlay = !document.getElementById('drop').hidden;
        log.dispatchEvent(
          new DragEvent('drop', {dataTransfer: dropped, bubbles: true, cancelable: true}));
        const pasted = files(new File([bytes], 'pasted.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(
          new ClipboardEvent('paste', {clipboardData: pasted, bubbles: true, cancelable: true}));
        return overlay;""", base64.b64encode(png(8, 6)).decode())
    assert result is True  # dragging files over the page shows where to drop them
    wait_for(lambda: len(page.qa("#thumbs img")) == 2, what="two thumbnails")
    assert [i.get_attribute("alt") for i in page.qa("#thumbs img")] == ["dropped.png", "pasted.png"]
    assert all(i.get_attribute("src").startswith("data:image/png;base64,") for i in page.qa("#thumbs img"))
    assert not page.q("#drop").is_displayed()
    assert page.q("#composer-error").text == "notes.txt is not an image."
    page.q('#thumbs button[aria-label="Remove dropped.png"]').send_keys(Keys.ENTER)  # by keyboard too
    assert [i.get_attribute("alt") for i in page.qa("#thumbs img")] == ["pasted.png"]
    assert page.js("return document.activeElement.id") == "prompt"  # focus goes back to the message box
