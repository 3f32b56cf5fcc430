"""FastAPI app: thin routes over `Frontend`, OpenAI-shaped errors, health, metrics (auth and body limits: middleware.py).

`create_app(Settings(model=...))` returns the app; the model loads in a background thread at
startup (`/health` answers 503 until it is ready). Run it with uvicorn or `phi3v serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from phi3v.lora_io import check_adapter_name
from phi3v.output import Completion
from phi3v.processing.chat import PromptError
from phi3v.processing.fetch import MIN_FETCH_RATE
from phi3v.processing.image_io import MAX_IMAGE_PIXELS, ImageInputError
from phi3v.server.admission import MAX_WAITING_BYTES
from phi3v.server.frontend import Frontend, QueueFull, RequestFailed, RequestStream, ServerMetrics
from phi3v.server.middleware import RequestGuard, error_response
from phi3v.server.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                                   ChunkChoice, DeltaMessage, ErrorResponse, Health, ModelCard, ModelList, Usage,
                                   choice_logprobs, error_body, validation_message)
from phi3v.server.webui import add_web_ui

log = logging.getLogger("phi3v.server")


@dataclass
class Settings:
    model: str
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_url_images: bool = False
    allowed_media_dir: str | None = None
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_queue: int = 256
    max_images_per_request: int = 8
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_image_bytes: int = 20 * 2**20
    image_timeout: float = 10.0  # per socket operation of an image download
    image_fetch_deadline: float = 30.0  # a whole image download, redirects included
    image_min_rate: float = MIN_FETCH_RATE  # bytes/s a download must average once image_timeout has passed
    max_waiting_bytes: int = MAX_WAITING_BYTES  # prepared crops of accepted requests not yet prefilled
    num_crops: int | None = None
    device: str | None = None
    dtype: str | None = None
    kv_cache_dtype: str = "auto"
    quantization: Any = None  # None, "fp8", "int4" or a phi3v.models.quant.QuantSpec
    lora: str | None = None  # a LoRA adapter folder merged into the weights at load
    loras: dict[str, str] = field(default_factory=dict)  # {name: folder}: adapters a request names in `model`
    max_body_bytes: int = 100 * 2**20
    engine_switches: dict[str, Any] = field(default_factory=dict)  # more EngineConfig fields (phi3v.cli.engine_switches)
    web_ui: bool = True  # the chat page at / (phi3v/server/webui.py); --no-web-ui turns it off

    def __post_init__(self) -> None:
        for name in self.loras:
            check_adapter_name(name)
        if self.model_id in self.loras:
            raise ValueError(f"--lora {self.model_id}=...: an adapter cannot be named as the served model")

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    def adapter(self, model: str) -> str | None:
        """The per-request LoRA adapter a request's `model` names: the base model's id (None), an adapter's name or
        `BASE:NAME` (as vLLM names them). APIError 404 for anything else."""
        if model == self.model_id:
            return None
        base, sep, name = model.rpartition(":")
        if model in self.loras:
            return model
        if sep and base == self.model_id and name in self.loras:
            return name
        served = ", ".join(repr(m) for m in [self.model_id, *self.loras])
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served}", param="model",
                       code="model_not_found")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.headers = param, code, headers


_err = error_response


class _State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_id)
        self.frontend: Frontend | None = None
        self.status, self.detail = "loading", None  # -> "ok" | "error"

    def load(self) -> None:
        s = self.settings
        try:
            from phi3v.api import LLM

            t0 = time.perf_counter()
            llm = LLM(s.model, device=s.device, dtype=s.dtype, max_num_seqs=s.max_num_seqs,
                      max_model_len=s.max_model_len, allow_url_images=s.allow_url_images,
                      kv_cache_dtype=s.kv_cache_dtype, quantization=s.quantization, lora=s.lora,
                      loras=s.loras or None, **s.engine_switches)
            llm.warmup()  # every CUDA graph and first kernel use now (blank requests), not as the first requests arrive
            load_kwargs = dict(allowed_dir=s.allowed_media_dir, allow_paths=s.allowed_media_dir is not None,
                               allow_urls=s.allow_url_images, max_bytes=s.max_image_bytes, timeout=s.image_timeout,
                               deadline=s.image_fetch_deadline, min_rate=s.image_min_rate, max_pixels=s.max_image_pixels)
            fe = Frontend(llm, max_queue=s.max_queue, max_images=s.max_images_per_request, load_kwargs=load_kwargs,
                          default_num_crops=s.num_crops, metrics=self.metrics, max_waiting_bytes=s.max_waiting_bytes)
            fe.start()
            self.frontend, self.status = fe, "ok"
            log.info("model %s loaded in %.1fs (%s, %s); serving as %r", s.model, time.perf_counter() - t0,
                     llm.device, llm.dtype, s.model_id)
        except Exception as e:  # noqa: BLE001 - reported by /health, not raised into uvicorn
            self.status, self.detail = "error", f"loading the model failed: {type(e).__name__}: {e}"
            log.exception("loading the model failed")

    def ready(self) -> Frontend:
        if self.frontend is None:
            msg = ("the model is still loading; retry shortly" if self.status == "loading"
                   else (self.detail or "not ready"))
            raise APIError(503, msg, "server_error", code="model_not_ready", headers={"Retry-After": "5"})
        return self.frontend


class _SSE(StreamingResponse):
    """SSE that always watches for the client leaving and calls `on_close` however the stream ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Any, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
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


# ---------------------------------------------------------------- request -> engine inputs, outputs -> responses


async def _until_disconnect(request: Request) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


async def _collect(stream: RequestStream) -> Completion:
    async for _delta, done in stream.events():
        if done is not None:
            return done
    raise RequestFailed("the request ended without a result")


def _sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def _parse_chat(request: Request) -> ChatCompletionRequest:
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
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]) from None


async def _submit_unless_gone(fe: Frontend, request: Request, rid: str, held: list[list[dict[str, Any]]],
                              params: Any, crops: int | None, n_images: int) -> RequestStream | None:
    """`fe.submit`, given up (its preparation cancelled) when the client disconnects first: None then. The
    messages come in a list that is emptied here, so that only the preparation holds them, until it is done."""
    task = asyncio.ensure_future(fe.submit(rid, held.pop(), params, crops, n_images))
    watch = asyncio.ensure_future(_until_disconnect(request))
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


def _document_chat_body(app: FastAPI) -> None:
    """The chat route reads its body itself (see _parse_chat); its schema goes into the OpenAPI document here."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = base()
        schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/Req_{model}")
        defs = schema.pop("$defs", {})
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        comps.update({f"Req_{k}": v for k, v in defs.items()})
        comps["Req_ChatCompletionRequest"] = schema
        op = doc["paths"]["/v1/chat/completions"]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Req_ChatCompletionRequest"}}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------- the app


def create_app(settings: Settings) -> FastAPI:
    state = _State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="phi3v-load", daemon=True).start()
        yield
        if state.frontend is not None:
            state.frontend.stop()  # joins the engine thread (bounded); fails what is still in flight

    app = FastAPI(title="phi3v", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible chat completions for Phi-3-vision / Phi-3.5-vision")
    app.state.phi3v = state
    app.add_middleware(RequestGuard, max_body=settings.max_body_bytes, api_key=settings.api_key)
    _document_chat_body(app)

    errors = {c: {"model": ErrorResponse} for c in (400, 401, 404, 413, 429, 500, 503)}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _err(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        msg, param, code = validation_message(e.errors())
        return _err(400, msg, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        typ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _err(e.status_code, str(e.detail), typ, code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, e: QueueFull) -> JSONResponse:
        return _err(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(ValueError)
    async def _value(request: Request, e: ValueError) -> JSONResponse:
        param = "messages" if isinstance(e, (ImageInputError, PromptError)) else None
        code = "invalid_image" if isinstance(e, ImageInputError) else getattr(e, "code", None)
        return _err(400, " ".join(str(e).split()) or "invalid request", param=param, code=code)

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, e: RequestFailed) -> JSONResponse:
        return _err(500, str(e), "server_error", code="request_failed")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.error("[%s] internal error: %s: %s", request.scope.get("state", {}).get("rid"), type(e).__name__, e)
        return _err(500, "internal server error", "server_error", code="internal_error")

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        ok = state.status == "ok" and not (state.frontend and state.frontend.dead)
        return JSONResponse(Health(status="ok" if ok else state.status, detail=state.detail).model_dump(),
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.web_ui:
        add_web_ui(app)

    @app.get("/v1/models", response_model=ModelList, responses=errors)
    async def models() -> ModelList:
        fe = state.frontend
        ctx = fe.engine.max_model_len if fe else settings.max_model_len
        base = ModelCard(id=settings.model_id, root=settings.model, max_model_len=ctx)
        return ModelList(data=[base] + [ModelCard(id=name, root=path, parent=settings.model_id, max_model_len=ctx)
                                        for name, path in settings.loras.items()])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=errors)
    async def chat_completions(request: Request) -> Any:
        rid: str = request.scope["state"]["rid"]
        req = await _parse_chat(request)
        adapter = settings.adapter(req.model)
        fe = state.ready()
        params = req.sampling_params(fe.engine.max_model_len)
        params.lora = adapter
        messages = [m.to_internal() for m in req.messages]
        crops, n_images, streaming = req.crops(settings.num_crops), req.num_images(), req.stream
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        del req  # the parsed body (its base64 images) is not kept while the request waits or runs
        held = [messages]
        del messages
        stream = await _submit_unless_gone(fe, request, rid, held, params, crops, n_images)
        if stream is None:
            return Response(status_code=499)
        model = settings.model_id if adapter is None else adapter
        if not streaming:
            task = asyncio.ensure_future(_collect(stream))
            watch = asyncio.ensure_future(_until_disconnect(request))
            try:
                await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when this handler is cancelled (shutdown)
                watch.cancel()
                if not task.done():
                    task.cancel()
                    stream.close()  # the client left: abort, free its KV blocks
            if not task.done() or task.cancelled():
                return Response(status_code=499)
            done = task.result()
            body = ChatCompletion(id=rid, model=model, usage=Usage(**done.usage), choices=[Choice(
                message=AssistantMessage(content=done.text), finish_reason=done.finish_reason,
                logprobs=choice_logprobs(fe.llm.tokenizer, done.logprobs))])
            return JSONResponse(body.model_dump())

        created = int(time.time())

        def chunk(delta: DeltaMessage, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, model=model, created=created,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)])

        async def events() -> AsyncIterator[str]:
            try:
                yield _sse(chunk(DeltaMessage(role="assistant", content="")))
                async for delta, done in stream.events():
                    if delta:
                        yield _sse(chunk(DeltaMessage(content=delta)))
                    if done is not None:
                        yield _sse(chunk(DeltaMessage(), done.finish_reason))
                        if include_usage:
                            yield _sse(ChatCompletionChunk(id=rid, model=model, created=created, choices=[],
                                                           usage=Usage(**done.usage)))
            except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, no traceback
                if isinstance(e, ValueError):
                    body = error_body(" ".join(str(e).split()), "invalid_request_error")
                elif isinstance(e, RequestFailed):
                    body = error_body(str(e), "server_error", code="request_failed")
                else:
                    log.error("[%s] stream failed: %s: %s", rid, type(e).__name__, e)
                    body = error_body("internal server error", "server_error", code="internal_error")
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return _SSE(events(), stream.close, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
