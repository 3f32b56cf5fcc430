"""What every generating route does around the front end: read and check the body, submit the request unless the
client has left, wait for every choice (or stream them as server-sent events), and notice a client that leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Callable, TypeVar

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from phi3v.output import Completion
from phi3v.server.frontend import Frontend, RequestFailed, RequestStream
from phi3v.server.protocol import SamplingRequest, error_body

log = logging.getLogger("phi3v.server")
M = TypeVar("M", bound=BaseModel)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.headers = param, code, headers


class SSE(StreamingResponse):
    """SSE that always watches for the client leaving and calls `on_close` however the stream ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


def sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def sse_error(rid: str, e: Exception) -> str:
    """An error after the headers were sent: reported in-band, no traceback."""
    if isinstance(e, ValueError):
        body = error_body(" ".join(str(e).split()), "invalid_request_error")
    elif isinstance(e, RequestFailed):
        body = error_body(str(e), "server_error", code="request_failed")
    else:
        log.error("[%s] stream failed: %s: %s", rid, type(e).__name__, e)
        body = error_body("internal server error", "server_error", code="internal_error")
    return f"data: {json.dumps(body)}\n\n"


async def until_disconnect(request: Request) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


async def parse_body(request: Request, model: type[M]) -> M:
    """The body, parsed and validated here rather than by a FastAPI body parameter: FastAPI would keep the raw
    bytes and the parsed JSON for as long as the handler runs, so a waiting request with a 15 MB body held
    several copies of it. Here they are dropped once validated."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype and not (ctype == "application/json" or ctype.endswith("+json")):
        raise APIError(400, f"the request body must be JSON (Content-Type: application/json), got {ctype!r}",
                       code="invalid_content_type")
    raw = await request.body()
    request.__dict__.pop("_body", None)  # Starlette's cached copy
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]) from None


def check_request(req: SamplingRequest, settings: Any) -> str | None:
    """Unknown fields, the model's name and n, before any work. Returns the per-request LoRA adapter the `model`
    field names (None: the base model); APIError 404 for a model that is not served."""
    unknown = req.unknown_fields()
    if unknown:
        raise APIError(400, f"unsupported parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                       "(docs/server.md lists the supported ones)", param=unknown[0], code="unsupported_parameter")
    adapter = settings.adapter(req.model)
    max_n = settings.max_num_seqs
    if (req.n or 1) > max_n:
        raise APIError(400, f"n is {req.n} but this server runs at most {max_n} sequences at once (--max-num-seqs)",
                       param="n", code="invalid_value")
    return adapter


def check_params(params: Any, fe: Frontend) -> None:
    """What only the loaded model can tell, before the request is queued (a streaming request's headers are not
    sent yet): logit_bias's token ids."""
    try:
        params.check_vocab(fe.engine.cfg.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), param="logit_bias", code="invalid_value") from None


async def submit_unless_gone(fe: Frontend, request: Request, rid: str, held: list[Any], params: Any,
                             crops: int | None, n_images: int) -> RequestStream | None:
    """`fe.submit`, given up (its preparation cancelled) when the client disconnects first: None then. The
    inputs come in a list that is emptied here, so that only the preparation holds them, until it is done."""
    task = asyncio.ensure_future(fe.submit(rid, held.pop(), params, crops, n_images))
    watch = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # submit's cancellation sets the preparation's cancel event
    if task.cancelled():
        log.info("[%s] client gone during preparation", rid)
        return None
    return task.result()


async def _collect(stream: RequestStream) -> list[Completion]:
    got: list[Completion | None] = [None] * stream.n
    async for item in stream.events():
        if item.done is not None:
            got[item.index] = item.done
    if any(c is None for c in got):
        raise RequestFailed("the request ended without a result")
    return got  # type: ignore[return-value]


async def collect_unless_gone(request: Request, stream: RequestStream) -> list[Completion] | None:
    """Every choice's Completion (index order); None when the client left first (the request is aborted)."""
    task = asyncio.ensure_future(_collect(stream))
    watch = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the handler is cancelled (shutdown)
        watch.cancel()
        if not task.done():
            task.cancel()
            stream.close()  # the client left: abort, free its KV blocks
    if not task.done() or task.cancelled():
        return None
    return task.result()


async def respond(request: Request, stream: RequestStream | None, streaming: bool,
                 events: Callable[[], AsyncIterator[str]], body: Callable[[list[Completion]], BaseModel]) -> Response:
    """The response of a submitted request: 499 when the client left first, the SSE `events()` when streaming,
    else the JSON `body(choices)` once every choice is done."""
    if stream is None:
        return Response(status_code=499)
    if streaming:
        return SSE(events(), stream.close)
    done = await collect_unless_gone(request, stream)
    if done is None:
        return Response(status_code=499)
    return JSONResponse(body(done).model_dump(exclude_none=False))


def total_usage(done: list[Completion]) -> dict[str, Any]:
    """The usage of n choices: the prompt once, every choice's generated tokens."""
    u = min(done, key=lambda c: c.index).usage  # choice 0 computed the prompt; the others found it in the prefix cache
    gen = sum(c.usage["completion_tokens"] for c in done)
    cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": gen, "total_tokens": u["prompt_tokens"] + gen,
            "prompt_tokens_details": {"cached_tokens": cached}}
