"""FastAPI app: thin routes over `Frontend`, OpenAI-shaped errors, health, metrics (auth and body limits: middleware.py).

`create_app(Settings(model=...))` returns the app; the model loads in a background thread at
startup (`/health` answers 503 until it is ready). Run it with uvicorn or `phi3v serve`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from phi3v import __version__
from phi3v.lora_io import check_adapter_name
from phi3v.processing.chat import PromptError
from phi3v.processing.fetch import MIN_FETCH_RATE
from phi3v.processing.image_io import MAX_IMAGE_PIXELS, ImageInputError
from phi3v.server.admission import MAX_WAITING_BYTES
from phi3v.server.chat import add_chat_route
from phi3v.server.completions import CompletionRequest, add_completions_route
from phi3v.server.frontend import Frontend, QueueFull, RequestFailed, ServerMetrics
from phi3v.server.middleware import RequestGuard, error_response
from phi3v.server.protocol import ChatCompletionRequest, ErrorResponse, Health, ModelCard, ModelList
from phi3v.server.validation import validation_message
from phi3v.server.routes_extra import add_extra_routes
from phi3v.server.serving import APIError
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
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the API from a browser (--cors-origin); none: off

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

    def model_cards(self) -> list[ModelCard]:
        """The base model, then each per-request LoRA adapter (its parent is the base)."""
        s, fe = self.settings, self.frontend
        ctx = fe.engine.max_model_len if fe else s.max_model_len
        return [ModelCard(id=s.model_id, root=s.model, max_model_len=ctx)] + [
            ModelCard(id=name, root=path, parent=s.model_id, max_model_len=ctx) for name, path in s.loras.items()]

    def ready(self) -> Frontend:
        if self.frontend is None:
            msg = ("the model is still loading; retry shortly" if self.status == "loading"
                   else (self.detail or "not ready"))
            raise APIError(503, msg, "server_error", code="model_not_ready", headers={"Retry-After": "5"})
        return self.frontend


def _document_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """The generating routes read their bodies themselves (serving.parse_body); their schemas go into the OpenAPI
    document here. bodies: path -> request model."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = base()
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/Req_{model}")
            comps.update({f"Req_{k}": v for k, v in schema.pop("$defs", {}).items()})
            comps[f"Req_{model.__name__}"] = schema
            doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/Req_{model.__name__}"}}}}
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

    app = FastAPI(title="phi3v", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions for Phi-3-vision / Phi-3.5-vision")
    app.state.phi3v = state
    app.add_middleware(RequestGuard, max_body=settings.max_body_bytes, api_key=settings.api_key)
    if settings.cors_origins:  # outermost: a preflight (no API key) is answered before the guard
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "Retry-After"])
    _document_bodies(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest})
    errors = {c: {"model": ErrorResponse} for c in (400, 401, 404, 413, 429, 500, 503)}
    _add_error_handlers(app)
    _add_service_routes(app, state, errors)
    if settings.web_ui:
        add_web_ui(app)
    add_chat_route(app, state, errors)
    add_completions_route(app, state, errors)
    add_extra_routes(app, state, errors)
    return app


def _add_error_handlers(app: FastAPI) -> None:
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
        # where the prompt came from: chat's messages, or the prompt of /v1/completions and /tokenize
        where = "messages" if request.url.path.endswith("/chat/completions") else "prompt"
        param = where if isinstance(e, (ImageInputError, PromptError)) else None
        code = "invalid_image" if isinstance(e, ImageInputError) else getattr(e, "code", None)
        return _err(400, " ".join(str(e).split()) or "invalid request", param=param, code=code)

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, e: RequestFailed) -> JSONResponse:
        return _err(500, str(e), "server_error", code="request_failed")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.error("[%s] internal error: %s: %s", request.scope.get("state", {}).get("rid"), type(e).__name__, e)
        return _err(500, "internal server error", "server_error", code="internal_error")


def _add_service_routes(app: FastAPI, state: _State, errors: dict[int | str, Any]) -> None:
    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        ok = state.status == "ok" and not (state.frontend and state.frontend.dead)
        return JSONResponse(Health(status="ok" if ok else state.status, detail=state.detail).model_dump(),
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=errors)
    async def models() -> ModelList:
        return ModelList(data=state.model_cards())
