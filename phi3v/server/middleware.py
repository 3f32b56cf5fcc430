"""The pure-ASGI guard in front of every route: request id, API key, body size, access log.

Order matters for isolation: the API key is checked from the headers before a byte of the body is
read (an unauthenticated client cannot make the server buffer or parse 100 MB), and the body is
read here, counted as it arrives (chunked bodies too), so an oversized one is a 413 as soon as it
crosses the limit. The body is then handed to the app once and not kept here (the chat route drops
its own reference once it has parsed it).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from starlette.responses import JSONResponse

from phi3v.server.protocol import error_body

log = logging.getLogger("phi3v.server")

OPEN_PATHS = ("/health", "/metrics")  # answered without the API key (probes, scrapers)


def needs_key(path: str) -> bool:
    """Everything but the probes and the chat page's static files (the page sends the key with its API calls)."""
    return path not in OPEN_PATHS and path != "/" and not path.startswith("/ui/")


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def key_ok(headers: dict[bytes, bytes], api_key: str) -> bool:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class RequestGuard:
    def __init__(self, app: Any, max_body: int, api_key: str | None) -> None:
        self.app, self.max_body, self.api_key = app, max_body, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        rid = (f"chatcmpl-{uuid.uuid4().hex}" if path.endswith("/chat/completions")
               else f"cmpl-{uuid.uuid4().hex}" if path.endswith("/completions") else f"req-{uuid.uuid4().hex[:16]}")
        scope.setdefault("state", {})["rid"] = rid
        t0, status = time.perf_counter(), [0]

        async def send_with_id(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg["headers"] = list(msg.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(msg)

        try:
            refusal = self._refuse(scope)
            if refusal is None:
                replay, refusal = await self._read_body(receive)
                if replay is None and refusal is None:
                    return  # the client left while sending its body: nobody to answer
            if refusal is not None:
                return await refusal(scope, receive, send_with_id)
            await self.app(scope, replay, send_with_id)
        finally:
            if scope["path"] not in OPEN_PATHS or status[0] >= 400:
                log.info("[%s] %s %s -> %s in %.3fs", rid, scope["method"], scope["path"], status[0],
                         time.perf_counter() - t0)

    def _refuse(self, scope: dict) -> JSONResponse | None:
        """401 or 413 from the headers alone."""
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and needs_key(scope["path"]) and not key_ok(headers, self.api_key):
            return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            return self._too_large(f"the request body is {int(length)} bytes")
        return None

    def _too_large(self, what: str) -> JSONResponse:
        return error_response(413, f"{what}, over the limit of {self.max_body} (--max-body-bytes)",
                              code="request_too_large")

    async def _read_body(self, receive: Any) -> tuple[Any, JSONResponse | None]:
        """(a receive that hands the whole body over once, then the client's own events; or a 413; or neither
        when the client left before its body was complete)."""
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # http.disconnect
                return None, None
            seen += len(msg.get("body", b""))
            if seen > self.max_body:
                return None, self._too_large(f"the request body is more than {self.max_body} bytes")
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        chunks.clear()
        pending = [first]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        return replay, None
