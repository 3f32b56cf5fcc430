"""The async front end: one thread owns the engine, asyncio handlers talk to it through queues.

- Preparation (image download/decoding, cropping, tokenization) runs in small thread pools, so a
  slow or huge image never stalls decoding; its errors go back to that request only.
- The engine thread loops: take commands (add / abort) from a thread-safe queue, step the request
  driver (phi3v/driver.py: the engine step, text deltas, stop strings) and hand each request's
  events to its asyncio queue with `loop.call_soon_threadsafe`.
- Robustness: the engine fails only the sequences a failure can be pinned on (a failed batched
  prefill is retried one sequence at a time inside the engine); a bug in the loop itself fails the
  requests in flight, and the loop goes on.
- Bounded: at most `max_num_seqs + max_queue` requests are accepted at once, and the prepared crops of
  requests not yet prefilled hold at most `max_waiting_bytes`; beyond either `submit` raises `QueueFull`
  (the route answers 429 with Retry-After). Preparation runs in one pool per kind of work (text only,
  local images, downloads), stops early when the client leaves, and any unexpected exception in it is
  the request's 400 (admission.py).
- A backlog costs no GPU memory: once more than `device_waiting` accepted requests are not running,
  new ones move their crops to pinned host memory (the engine copies them back when it encodes them).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from phi3v.driver import RequestDriver
from phi3v.output import Completion
from phi3v.processing.limits import Cancelled, check_image_count
from phi3v.server.admission import (MAX_WAITING_BYTES, PreparationError, QueueFull, WaitingBytes, pool_kind,
                                    prepared_bytes)

log = logging.getLogger("phi3v.server")


class RequestFailed(Exception):
    """The request failed inside the engine (not the client's fault)."""


class ServerMetrics:
    """Prometheus metrics in their own registry (several apps may live in one process)."""

    def __init__(self, model: str) -> None:
        self.registry = r = CollectorRegistry()
        lbl = ["model"]
        self.requests = Counter("phi3v_requests", "Finished requests by outcome", lbl + ["outcome"], registry=r)
        self.prompt_tokens = Counter("phi3v_prompt_tokens", "Prompt tokens (images included)", lbl, registry=r)
        self.gen_tokens = Counter("phi3v_generation_tokens", "Generated tokens", lbl, registry=r)
        self.ttft = Histogram("phi3v_time_to_first_token_seconds", "Arrival to first token", lbl, registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.e2e = Histogram("phi3v_e2e_request_latency_seconds", "Arrival to last token", lbl, registry=r,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.req_tps = Histogram("phi3v_request_decode_tokens_per_second", "Decode speed per request", lbl,
                                 registry=r, buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
        self.tps = Gauge("phi3v_generation_tokens_per_second", "Tokens generated per second, last 5 s", lbl,
                         registry=r)
        self.running = Gauge("phi3v_num_requests_running", "Requests decoding in the engine", lbl, registry=r)
        self.waiting = Gauge("phi3v_num_requests_waiting", "Accepted requests not yet running", lbl, registry=r)
        self.kv_usage = Gauge("phi3v_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", lbl, registry=r)
        self.kv_tokens = Gauge("phi3v_kv_cache_tokens_used", "Tokens held in the KV cache", lbl, registry=r)
        self.model = model

    def outcome(self, name: str) -> None:
        self.requests.labels(self.model, name).inc()


@dataclass
class PromptInput:
    """A text completion's input: the prompt in the chat format with `<|image_N|>` tags, and the image sources."""

    prompt: str
    images: list[str]

    def as_messages(self) -> list[dict[str, Any]]:  # for pool_kind: what kind of work preparing it is
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in self.images]}]


@dataclass
class StreamItem:
    index: int  # the choice
    delta: str
    done: Completion | None  # that choice's Completion, once it is over
    logprobs: list[dict[str, Any]] | None  # entries of the tokens of this step (when logprobs were asked for)


@dataclass
class _Handle:
    rid: str
    loop: asyncio.AbstractEventLoop
    q: asyncio.Queue
    prep: Any  # phi3v.api.PreparedRequest; None once prefilled (or over)
    arrival: float
    held_bytes: int = 0  # counted in Frontend.waiting until the prefill (first output) or the end
    first: float | None = None
    left: int = 1  # choices not finished yet (params.n)


class RequestStream:
    """What `Frontend.submit` returns: iterate `events()` for StreamItems until every choice is done."""

    def __init__(self, fe: "Frontend", h: _Handle) -> None:
        self._fe, self._h, self.finished = fe, h, False
        self.rid = h.rid
        self.prompt_tokens = len(h.prep.prompt_ids)
        self.n = h.left

    async def events(self) -> AsyncIterator[StreamItem]:
        left = self.n
        try:
            while left:
                item, err = await self._h.q.get()
                if err is not None:
                    self.finished = True
                    raise err
                if item.done is not None:
                    left -= 1
                    self.finished = left == 0
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Abort the request unless it finished (client gone, handler cancelled): frees its KV blocks."""
        if not self.finished:
            self.finished = True
            self._fe.abort(self.rid)


class Frontend:
    def __init__(self, llm: Any, *, max_queue: int = 256, max_images: int = 8,
                 load_kwargs: dict[str, Any] | None = None, default_num_crops: int | None = None,
                 prepare_workers: int = 4, metrics: ServerMetrics | None = None,
                 max_waiting_bytes: int = MAX_WAITING_BYTES) -> None:
        self.llm, self.engine = llm, llm.engine
        self.max_queue, self.max_images = max_queue, max_images
        self.driver = RequestDriver(self.engine, llm.tokenizer, llm.config.eos_token_ids)
        self.capacity = self.engine.max_num_seqs + max_queue
        # beyond this many accepted requests not yet running, new ones keep their crops in host memory
        self.device_waiting = max(16, self.engine.max_num_seqs)
        self.load_kwargs = dict(load_kwargs or {})
        self.default_num_crops = default_num_crops
        self.metrics = metrics or ServerMetrics(getattr(llm, "model_name", "model"))
        self._cmds: queue.Queue = queue.Queue()
        # one pool per kind of work: slow image hosts cannot starve local images, nor cropping text requests
        self._pools = {"images": ThreadPoolExecutor(max_workers=prepare_workers, thread_name_prefix="phi3v-prep"),
                       "fetch": ThreadPoolExecutor(max_workers=2 * prepare_workers, thread_name_prefix="phi3v-fetch"),
                       "text": ThreadPoolExecutor(max_workers=2, thread_name_prefix="phi3v-text")}
        self.waiting = WaitingBytes(max_waiting_bytes)
        self._lock = threading.Lock()
        self.active = 0  # accepted, not yet finished
        self._handles: dict[str, _Handle] = {}  # in the engine (engine thread only)
        self._recent: deque[tuple[float, int]] = deque()
        self._stop = threading.Event()
        self.dead: str | None = None
        self._thread = threading.Thread(target=self._run, name="phi3v-engine", daemon=True)

    # ---------------------------------------------------------------- async side
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(("wake", None))
        self._thread.join(timeout=10)
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return max(0, self.active - self.engine.num_running)

    async def submit(self, rid: str, messages: list[dict[str, Any]] | PromptInput, params: Any,
                     num_crops: int | None = None, n_images: int = 0) -> RequestStream:
        """Prepare the request (chat messages or a PromptInput; off the engine thread and the event loop) and queue
        it. Raises QueueFull, ValueError (bad input: 400), RequestFailed. Cancelling it (the client left) stops the
        preparation at its next check."""
        if self.dead:
            raise RequestFailed(f"the engine stopped: {self.dead}")
        check_image_count(n_images, self.max_images)
        with self._lock:
            if self.active >= self.capacity or self.waiting.full():
                self.metrics.outcome("rejected")
                raise QueueFull(self._retry_after(), "too many requests are waiting" if self.active >= self.capacity
                                else self.waiting.why())
            self.active += 1
        arrival = time.perf_counter()
        handed, cancel = False, threading.Event()
        try:
            loop = asyncio.get_running_loop()
            crops = num_crops if num_crops is not None else self.default_num_crops
            pool = self._pools[pool_kind(messages.as_messages() if isinstance(messages, PromptInput) else messages)]
            job = [messages]
            del messages
            prep = await loop.run_in_executor(pool, lambda: self._prepare(job.pop(), params, crops, cancel))
            h = _Handle(rid, loop, asyncio.Queue(), prep, arrival, held_bytes=prepared_bytes(prep), left=params.n)
            del prep
            if not self.waiting.add(h.held_bytes):
                self.metrics.outcome("rejected")
                raise QueueFull(self._retry_after(), self.waiting.why())
            self._cmds.put(("add", h))
            handed = True
            return RequestStream(self, h)
        except ValueError:
            self.metrics.outcome("invalid")
            raise
        except (asyncio.CancelledError, Cancelled):
            cancel.set()
            self.metrics.outcome("aborted")
            raise asyncio.CancelledError from None
        except QueueFull:
            raise
        except Exception as e:  # an input no check foresaw made preparation fail: the request's problem
            self.metrics.outcome("invalid")
            log.exception("[%s] preparation failed", rid)
            raise PreparationError(f"the request could not be prepared ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:200]}); check its images and text") from None
        finally:
            if not handed:
                with self._lock:
                    self.active -= 1

    def _retry_after(self) -> int:
        return 1 + self.active // max(1, self.engine.max_num_seqs)

    def _prepare(self, messages: list[dict[str, Any]] | PromptInput, params: Any, crops: int | None,
                 cancel: threading.Event) -> Any:
        if isinstance(messages, PromptInput):
            prep = self.llm.prepare(messages.prompt, messages.images, params, crops, cancel=cancel, **self.load_kwargs)
        else:
            prep = self.llm.prepare_chat(messages, params, crops, cancel=cancel, **self.load_kwargs)
        if self.num_waiting > self.device_waiting:  # it will wait behind a backlog: off the GPU meanwhile
            prep.to_host()
        return prep

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid))

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # the driver's view: sibling choices of an n > 1 request wait in it for the next step
                self._drain(block=not self.driver.has_unfinished())
                if self.driver.has_unfinished():
                    self._step()
                self._gauges()
            except Exception as e:  # a bug in the loop itself: fail everything in flight, keep going
                log.exception("engine loop error")
                for h in list(self._handles.values()):
                    self._fail(h, RequestFailed(f"engine error ({type(e).__name__})"))
        for h in list(self._handles.values()):
            self._fail(h, RequestFailed("the server is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.2) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = cmd
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self._abort(arg)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _add(self, h: _Handle) -> None:
        try:
            self.driver.add(h.prep, rid=h.rid)
        except Exception as e:
            self.driver.abort(h.rid)
            err = e if isinstance(e, ValueError) else RequestFailed(f"engine rejected the request ({type(e).__name__})")
            self._fail(h, err)
            return
        self._handles[h.rid] = h

    def _abort(self, rid: str) -> None:
        h = self._handles.pop(rid, None)
        if h is None:
            return
        self.driver.abort(rid)
        self._release(h, "aborted")
        log.info("[%s] aborted (client gone)", rid)

    def _unhold(self, h: _Handle) -> None:
        """Its crops are encoded (first output) or it is over: its bytes no longer count as waiting, and the handle
        lets go of the prepared request (the engine dropped its own reference to the crops after the prefill)."""
        h.prep = None
        if h.held_bytes:
            self.waiting.release(h.held_bytes)
            h.held_bytes = 0

    def _release(self, h: _Handle, outcome: str) -> None:
        self._unhold(h)
        self._handles.pop(h.rid, None)
        with self._lock:
            self.active -= 1
        self.metrics.outcome(outcome)

    def _push(self, h: _Handle, item: tuple[StreamItem | None, BaseException | None]) -> None:
        try:
            h.loop.call_soon_threadsafe(h.q.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            pass

    def _fail(self, h: _Handle, err: BaseException) -> None:
        self.driver.abort(h.rid)
        if isinstance(err, ValueError):
            log.info("[%s] rejected: %s", h.rid, err)
        else:
            log.warning("[%s] failed: %s", h.rid, err)
        self._push(h, (None, err))
        self._release(h, "invalid" if isinstance(err, ValueError) else "error")

    def _step(self) -> None:
        events = self.driver.step()
        now = time.perf_counter()
        n_tok = 0
        for ev in events:
            h = self._handles.get(ev.rid)
            if h is None:  # aborted meanwhile
                self.driver.abort(ev.rid)
                continue
            if ev.error is not None:
                self._fail(h, RequestFailed(str(ev.error)))
                continue
            n_tok += ev.n_tokens
            if h.first is None:
                h.first = now
                self._unhold(h)
                self.metrics.ttft.labels(self.metrics.model).observe(now - h.arrival)
            if ev.delta or ev.done is not None or ev.logprobs:
                self._push(h, (StreamItem(ev.index, ev.delta, ev.done, ev.logprobs), None))
            if ev.done is not None:
                h.left -= 1
                if h.left == 0:
                    self._finished(h, ev.done, now)
        if n_tok:
            self._recent.append((now, n_tok))
            self.metrics.gen_tokens.labels(self.metrics.model).inc(n_tok)

    def _finished(self, h: _Handle, done: Completion, now: float) -> None:
        m = self.metrics
        m.prompt_tokens.labels(m.model).inc(done.usage["prompt_tokens"])
        m.e2e.labels(m.model).observe(now - h.arrival)
        if done.timings.get("decode_tokens_per_s"):
            m.req_tps.labels(m.model).observe(done.timings["decode_tokens_per_s"])
        log.info("[%s] done: %s, %d prompt + %d generated tokens, %.3fs", h.rid, done.finish_reason,
                 done.usage["prompt_tokens"], done.usage["completion_tokens"], now - h.arrival)
        self._release(h, done.finish_reason or "stop")

    def _gauges(self) -> None:
        m, eng = self.metrics, self.engine
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - 5.0:
            self._recent.popleft()
        m.tps.labels(m.model).set(sum(n for _, n in self._recent) / 5.0)
        m.running.labels(m.model).set(eng.num_running)
        m.waiting.labels(m.model).set(self.num_waiting)
        m.kv_usage.labels(m.model).set(eng.kv_usage)
        m.kv_tokens.labels(m.model).set(eng.kv_tokens)
