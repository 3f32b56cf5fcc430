"""Shared helpers for the browser tests: a headless Debian Chromium driven by Selenium, screenshots.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`; scripts/test.sh
installs them when it runs as root). Without them the browser tests skip locally but FAIL in CI
(CI=true, or PHI3V_REQUIRE_BROWSER=1 as .ci/run sets), so a CI machine without a browser cannot pass
silently. No test in this module.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parent
ARTIFACTS = Path(os.environ.get("PHI3V_ARTIFACTS") or ROOT / "artifacts")
IN_CI = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in ("CI", "PHI3V_REQUIRE_BROWSER"))


def _missing(what: str) -> None:
    msg = f"the browser tests need {what} (apt-get install chromium chromium-driver; pip install selenium)"
    if IN_CI:
        pytest.fail(msg + " -- CI must run them", pytrace=False)
    pytest.skip(msg)


def _find(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if os.path.exists(os.environ[env]) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def chrome(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium (a fresh profile: empty localStorage) with a width x height viewport."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    browser = _find("PHI3V_CHROMIUM", "chromium", "chromium-browser")
    driver_path = _find("PHI3V_CHROMEDRIVER", "chromedriver")
    if browser is None or driver_path is None:
        _missing("chromium and chromedriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--disable-background-networking",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_script_timeout(30)
    viewport(driver, width, height)
    return driver


def viewport(driver: Any, width: int, height: int) -> None:
    """Emulates a device viewport (mobile below 600 px: the page's meta viewport applies)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def js_errors(driver: Any) -> list[str]:
    """SEVERE console entries since the last call (a script error on the page shows here), less the
    failed-status lines Chromium logs for every 4xx fetch the tests provoke on purpose."""
    return [e["message"] for e in driver.get_log("browser")
            if e.get("level") == "SEVERE" and "Failed to load resource" not in e["message"]]


# ---------------------------------------------------------------- a test-only stand-in for the completions route

# "response": a Starlette response that POST /v1/chat/completions answers with, once;
# "request": the JSON body that request carried (what the page sent)
FORCED: dict[str, Any] = {}


class ForcedReply:
    """ASGI middleware for the test server: while FORCED["response"] is set, the next chat completion
    gets it instead of the engine's answer (the tiny model's output is random tokens; this lets a test
    stream crafted text through the page's own JS). Everything else reaches the real app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions" and "response" in FORCED:
            import json

            body, more = b"", True
            while more:
                msg = await receive()
                body, more = body + msg.get("body", b""), msg.get("more_body", False)
            FORCED["request"] = json.loads(body)
            return await FORCED.pop("response")(scope, receive, send)
        await self.app(scope, receive, send)


def sse_reply(pieces: list[str], model: str) -> Any:
    """An OpenAI-shaped event stream whose deltas are `pieces`, then finish_reason stop and [DONE]."""
    import json

    from starlette.responses import Response

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": "chatcmpl-forced", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    text = chunk({"role": "assistant", "content": ""}) + "".join(chunk({"content": p}) for p in pieces)
    return Response(text + chunk({}, "stop") + "data: [DONE]\n\n", media_type="text/event-stream")


# ---------------------------------------------------------------- the page, as a user drives it

class Page:
    def __init__(self, driver: Any, url: str) -> None:
        self.d, self.url = driver, url

    def open(self, fresh: bool = True) -> "Page":
        """Loads the page; fresh: with empty localStorage (settings and key forgotten)."""
        self.d.get(self.url + "/")
        if fresh:
            self.d.execute_script("localStorage.clear()")
            self.d.get(self.url + "/")
        wait_for(lambda: self.d.execute_script("return document.readyState") == "complete", what="page load")
        return self

    def q(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)

    def qa(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, css)

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def settings(self, **values: Any) -> None:
        """Sets settings fields by id (num_crops -> #num-crops) as a user would, then closes the panel."""
        from selenium.webdriver.common.keys import Keys

        if self.q("#settings").get_attribute("hidden") is not None:
            self.q("#settings-toggle").click()
        for name, value in values.items():
            field = self.q("#" + name.replace("_", "-"))
            field.clear()
            field.send_keys(str(value), Keys.TAB)  # leaving the field fires `change` (stored in localStorage)
        self.q("#settings-toggle").click()

    def attach(self, *paths: Any) -> None:
        self.q("#file").send_keys("\n".join(str(p) for p in paths))

    def ask(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.q("#prompt")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def answers(self) -> list[Any]:
        return self.qa(".msg.assistant")

    def wait_answer(self, n: int, states: tuple[str, ...] = ("done",), timeout: float = 60) -> Any:
        """The n-th answer (1-based) once its state is one of `states`."""
        def ready() -> Any:
            got = self.answers()
            return got[n - 1] if len(got) >= n and got[n - 1].get_attribute("data-state") in states else None
        return wait_for(ready, timeout, f"answer {n} in state {states}")

    def record_stream(self) -> None:
        """From now on, every change of the last answer's rendered text is recorded (state, length)."""
        self.js("""window.__snaps = [];
            new MutationObserver(() => {
              const all = document.querySelectorAll('.msg.assistant'), last = all[all.length - 1];
              if (last) window.__snaps.push([last.dataset.state, last.querySelector('.md').textContent.length]);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true,
                                                         attributes: true});""")

    def recorded(self) -> list[tuple[str, int]]:
        return [tuple(x) for x in self.js("return window.__snaps")]

    def copy(self, n: int) -> str:
        """Clicks the n-th answer's Copy button; returns what the page put on the clipboard."""
        self.js("window.__copied = null; navigator.clipboard.writeText = async (t) => { window.__copied = t; };")
        self.answers()[n - 1].find_element("css selector", "button.copy").click()
        return wait_for(lambda: self.js("return window.__copied"), 5, "the copied text")


@pytest.fixture(scope="module")
def srv():
    """The test server with the page on, its completions answerable by a forced reply (`FORCED`)."""
    from server_harness import start_server

    return start_server("webui", before_start=lambda app: app.add_middleware(ForcedReply))


@pytest.fixture(scope="module")
def browser():
    driver = chrome()
    yield driver
    driver.quit()
