"""`phi3v serve --replicas N`: N engine replicas (one GPU each on CUDA) behind the same OpenAI routes, on Ray Serve.

    client -> Serve's HTTP proxy -> Gateway (1 replica, CPU: routes, 503s, aggregated /health and /metrics)
                                 -> Engine (N replicas): the very app of `phi3v serve` (phi3v/server/app.py), each
                                    with its own engine, driven in-process by the ASGI messages the Gateway forwards

- Routing: the Gateway calls the Engine deployment through a Serve handle, whose router sends each request to the
  less loaded of two replicas picked at random (Serve's power-of-two-choices on the replicas' queue lengths).
  Each replica takes up to max_num_seqs + max_queue requests at once (Serve's max_ongoing_requests), so its engine
  batches them as the single server does; past that its own queue answers 429.
- Streaming: the replica's response messages (status + headers, then each body chunk: SSE events) come back one by
  one through a streaming handle call; a client that leaves cancels the call, and the replica's app sees the
  disconnect (the request is aborted, its KV blocks freed).
- A replica that dies: Serve's controller starts a new one (its `check_health` also fails when its engine died or
  its model failed to load). Requests it held fail at once with 503 `replica_died` (before the first byte) or an
  in-band SSE error event followed by `[DONE]` (mid-stream); none hangs. New requests go to the live replicas.
- Health and metrics: each replica reports its status and Prometheus text to the Gateway every second; `/health`
  is 200 while at least one replica is ready (with every replica's status), `/metrics` gives every replica's series
  with a `replica` label, plus `phi3v_replicas_ready`.
"""

# no `from __future__ import annotations`: Serve rebuilds the routes' signatures, FastAPI must see real types

import asyncio
import contextlib
import json
import logging
import threading
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from ray import serve

from phi3v.server.app import Settings

log = logging.getLogger("phi3v.server")
REPORT_EVERY_S = 1.0
STALE_AFTER_S = 5.0  # a replica that has not reported for this long is not counted ready


def _error(status: int, message: str, code: str, retry: bool = True) -> Any:
    from fastapi.responses import JSONResponse

    from phi3v.server.protocol import error_body

    return JSONResponse(error_body(message, "server_error", code=code), status_code=status,
                        headers={"Retry-After": "1"} if retry else None)


class EngineReplica:
    """One engine: the `phi3v serve` app, loaded as its lifespan would (a background thread), called with ASGI
    messages. Deployed by `build_app` as the Serve deployment "Engine"."""

    def __init__(self, settings: Settings) -> None:
        from phi3v.server.app import create_app

        self.app = create_app(settings)
        self.state = self.app.state.phi3v
        threading.Thread(target=self.state.load, name="phi3v-load", daemon=True).start()
        self.closed = threading.Event()
        try:
            from ray import serve

            ctx = serve.get_replica_context()
            self.rid, self.app_name = ctx.replica_id.unique_id, ctx.app_name
        except Exception:  # noqa: BLE001 - outside Serve (the class alone): nobody to report to
            return
        threading.Thread(target=self._report_forever, name="phi3v-report", daemon=True).start()

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: a dead engine thread or a model that did not load."""
        fe = self.state.frontend
        if self.state.status == "error" or (fe is not None and fe.dead):
            raise RuntimeError(self.state.detail or "the engine stopped")

    def __del__(self) -> None:
        if getattr(self, "closed", None) is not None:
            self.closed.set()
        if getattr(self, "state", None) is not None and self.state.frontend is not None:
            self.state.frontend.stop()

    def _report_forever(self) -> None:
        """A thread: status and metrics to the Gateway every REPORT_EVERY_S (sync handle calls: no event loop here)."""
        from prometheus_client import generate_latest
        from ray import serve

        gateway = serve.get_deployment_handle("Gateway", self.app_name)
        while not self.closed.is_set():
            try:
                fe = self.state.frontend
                status = "ok" if self.state.status == "ok" and not (fe and fe.dead) else self.state.status
                text = generate_latest(self.state.metrics.registry).decode()
                gateway.report.remote(self.rid, status, self.state.detail, text).result(timeout_s=10)
            except Exception as e:  # noqa: BLE001 - the gateway (re)starting: report again next time
                log.debug("report to the gateway failed: %s", e)
            self.closed.wait(REPORT_EVERY_S)

    async def handle(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One HTTP request (method, path, query, headers, body) through the app: yields {"status", "headers"} then
        {"body": bytes} chunks. Cancelled (the client left): the app receives http.disconnect."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req["method"],
                 "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(), "root_path": "",
                 "query_string": req["query"], "headers": req["headers"], "client": req.get("client"),
                 "server": ("phi3v", 0)}
        out: asyncio.Queue = asyncio.Queue()
        left = asyncio.Event()
        sent = [False]

        async def receive() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": req["body"], "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            await out.put(msg)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _t: out.put_nowait(None))
        try:
            while (msg := await out.get()) is not None:
                if msg["type"] == "http.response.start":
                    yield {"status": msg["status"], "headers": [(bytes(k), bytes(v)) for k, v in msg["headers"]]}
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield {"body": bytes(msg["body"])}
                    if not msg.get("more_body"):
                        break
        finally:
            left.set()  # the app's disconnect watchers end; a stream still running aborts its request
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout=10)


class Gateway:
    """The HTTP entry: forwards every route to an Engine replica, answers /health and /metrics for all of them."""

    def __init__(self, engine: Any, replicas: int) -> None:
        self.engine, self.replicas = engine, replicas
        self.reports: dict[str, tuple[float, str, str | None, str]] = {}

    def report(self, rid: str, status: str, detail: str | None, metrics: str) -> None:
        self.reports[rid] = (time.monotonic(), status, detail, metrics)

    def live(self) -> dict[str, tuple[float, str, str | None, str]]:
        now = time.monotonic()
        return {k: v for k, v in self.reports.items() if now - v[0] < STALE_AFTER_S}

    def health(self) -> Any:
        from fastapi.responses import JSONResponse

        live = self.live()
        ready = sum(v[1] == "ok" for v in live.values())
        body = {"status": "ok" if ready else "loading", "replicas_ready": ready, "replicas": self.replicas,
                "detail": None if ready else "no engine replica is ready yet",
                "per_replica": {k: {"status": v[1], "detail": v[2]} for k, v in sorted(live.items())}}
        return JSONResponse(body, status_code=200 if ready else 503)

    def metrics(self) -> Any:
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        live = self.live()
        text = merge_metrics({k: v[3] for k, v in live.items()})
        ready = sum(v[1] == "ok" for v in live.values())
        text += ("# HELP phi3v_replicas_ready Engine replicas ready to serve\n# TYPE phi3v_replicas_ready gauge\n"
                 f"phi3v_replicas_ready {ready}\n")
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def forward(self, request: Any) -> Any:
        from fastapi.responses import StreamingResponse
        from ray.exceptions import RayActorError, RayError

        req = {"method": request.method, "path": request.url.path, "query": request.url.query.encode(),
               "headers": [(k.encode(), v.encode()) for k, v in request.headers.items()], "body": await request.body(),
               "client": (request.client.host, request.client.port) if request.client else None}
        gen = self.engine.options(stream=True).handle.remote(req)
        try:
            start = await gen.__anext__()
        except (RayActorError, RayError) as e:
            log.warning("replica failed before answering: %s", type(e).__name__)
            return _error(503, "the engine replica serving this request died; retry (Serve is restarting it)",
                          "replica_died")
        except StopAsyncIteration:
            return _error(503, "the engine replica ended the request without an answer; retry", "replica_died")
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in gen:
                    yield chunk["body"]
            except (asyncio.CancelledError, GeneratorExit):  # the client left: the replica's app sees it leave
                gen.cancel()
                raise
            except (RayActorError, RayError):
                if sse:  # headers are out: in-band, as the single server reports a failed stream
                    from phi3v.server.protocol import error_body

                    err = error_body("the engine replica serving this request died mid-stream; retry",
                                     "server_error", code="replica_died")
                    yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()

        headers = {k.decode(): v.decode() for k, v in start["headers"] if k.lower() != b"content-length"}
        return StreamingResponse(body(), status_code=start["status"], headers=headers)


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas -> one text: each family's HELP/TYPE once, then every replica's samples,
    each labelled with its replica (sum them in the query: `sum(phi3v_generation_tokens_total)`)."""
    heads: dict[str, list[str]] = {}  # family name (as its TYPE line has it) -> HELP/TYPE lines
    samples: dict[str, list[str]] = {}
    for rid, text in sorted(texts.items()):
        family = ""
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                if line not in heads.setdefault(family, []):
                    heads[family].append(line)
            elif line and not line.startswith("#"):
                samples.setdefault(family, []).append(_with_replica(line, rid))
    out = []
    for family, head in heads.items():
        out += head + samples.get(family, [])
    return "\n".join(out) + ("\n" if out else "")


def _with_replica(sample: str, rid: str) -> str:
    """`name{a="b"} 1.0` / `name 1.0` -> the same sample with replica="rid" among its labels."""
    label = 'replica="' + rid.replace("\\", "\\\\").replace('"', '\\"') + '"'
    brace, space = sample.find("{"), sample.find(" ")
    if 0 <= brace < space:
        return f"{sample[:brace + 1]}{label},{sample[brace + 1:]}" if sample[brace + 1] != "}" else \
            f"{sample[:brace + 1]}{label}{sample[brace + 1:]}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"


# ---------------------------------------------------------------- the Serve application


_api = FastAPI(title="phi3v", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(_api)
class GatewayIngress(Gateway):
    """Gateway's HTTP routes (at module level: a replica imports it, and FastAPI resolves `Request` here)."""

    @_api.get("/health")
    def _health(self) -> Any:
        return self.health()

    @_api.get("/metrics")
    def _metrics(self) -> Any:
        return self.metrics()

    @_api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def _forward(self, request: Request) -> Any:
        return await self.forward(request)


def build_app(settings: Settings, replicas: int, actor_options: dict[str, Any]) -> Any:
    """The Serve application: Gateway (ingress) -> Engine x replicas."""
    per_replica = settings.max_num_seqs + settings.max_queue
    gateway = serve.deployment(GatewayIngress, name="Gateway", num_replicas=1,
                               max_ongoing_requests=replicas * per_replica + 64, ray_actor_options={"num_cpus": 0})
    engine = serve.deployment(EngineReplica, name="Engine", num_replicas=replicas, max_ongoing_requests=per_replica,
                              health_check_period_s=2, health_check_timeout_s=30, ray_actor_options=actor_options)
    return gateway.bind(engine.bind(settings), replicas)


def run_serve(settings: Settings, replicas: int, address: str) -> int:
    """Start (or join, `address`) a Ray cluster, deploy, and serve until interrupted."""
    from phi3v.distributed.ray_batch import connect

    ray = connect(address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = settings.device or ("cuda" if gpus else "cpu")
    if device.startswith("cuda"):
        if gpus < replicas:
            raise ValueError(f"--replicas {replicas} needs {replicas} GPUs; the Ray cluster has {gpus}")
        options: dict[str, Any] = {"num_gpus": 1}
    else:
        options = {"num_cpus": min(1.0, float(ray.cluster_resources().get("CPU", 1)) / (2 * replicas))}
    settings.device = device
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, replicas, options), name="phi3v", route_prefix="/")
    log.info("phi3v: %d engine replicas on Ray Serve at http://%s:%d/v1 (%s)", replicas, settings.host, settings.port,
             device)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
