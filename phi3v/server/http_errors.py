"""uvicorn's own 400s (a request line or headers its parser refuses: a non-numeric Content-Length,
a malformed header, headers over the size limit) in the OpenAI error shape instead of plain text.

uvicorn answers those before any ASGI code runs, through its protocol's `send_400_response`; these
subclasses override only that method. `http_protocol()` gives the one to pass as `uvicorn.Config(http=...)`:
the httptools parser when it is installed (what uvicorn's "auto" picks), else h11.
"""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from phi3v.server.protocol import error_body


def _body(msg: str) -> bytes:
    return json.dumps(error_body(f"the HTTP request is malformed ({msg.rstrip('.')}); check the request line "
                                 "and headers", "invalid_request_error", code="bad_http_request")).encode()


class JSONErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = _body(msg)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def http_protocol() -> type[Any]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed
        return JSONErrorH11Protocol

    class JSONErrorHttpToolsProtocol(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            body = _body(msg)
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                        % len(body))
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return JSONErrorHttpToolsProtocol
