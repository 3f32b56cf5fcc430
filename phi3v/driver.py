"""The request driver: prepared requests into the engine, text deltas and Completions out.

One driver serves both callers of the engine: the Python API (`LLM.run`, on the caller's thread) and the
server's front end (on its engine thread). It adds requests, steps the engine, turns each request's tokens into
text (incremental detokenisation, stop strings: `RequestOutput`), and aborts a request in the engine as soon as
its text hits a stop string. It is not thread-safe: one thread drives it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from phi3v.engine.engine import Engine
from phi3v.output import Completion, RequestOutput


class RequestError(RuntimeError):
    """The engine failed this request (not the caller's input): the other requests went on."""


@dataclass
class Event:
    rid: str
    delta: str = ""
    done: Completion | None = None  # set once, when the request finishes
    error: RequestError | None = None  # the request failed (then done is None)
    n_tokens: int = 0  # tokens generated in this step (text may lag behind: stop strings, partial characters)


class RequestDriver:
    def __init__(self, engine: Engine, tokenizer: Any, eos_ids: list[int]) -> None:
        self.engine, self.tokenizer, self.eos_ids = engine, tokenizer, eos_ids
        self.outputs: dict[str, RequestOutput] = {}

    def add(self, prep: Any, rid: str | None = None, t0: float | None = None) -> str:
        """Queue a PreparedRequest (phi3v.api). Raises ValueError if the engine refuses it."""
        rid = self.engine.add_request(prep.prompt_ids, prep.images, prep.params, rid=rid)
        self.outputs[rid] = RequestOutput(self.tokenizer, len(prep.prompt_ids), prep.params, self.eos_ids,
                                          prep.preprocess_s, time.perf_counter() if t0 is None else t0)
        return rid

    def abort(self, rid: str) -> bool:
        """Stop a request (the client went away): its KV blocks are freed. False if it was not running."""
        self.outputs.pop(rid, None)
        return self.engine.abort(rid)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[Event]:
        """One engine step: an event for every request that generated a token, finished or failed."""
        events = []
        for o in self.engine.step():
            ro = self.outputs.get(o.rid)
            if ro is None:  # aborted since the step was scheduled
                self.engine.abort(o.rid)
                continue
            if o.finish_reason == "error":
                del self.outputs[o.rid]
                events.append(Event(o.rid, error=RequestError(f"the engine failed on this request ({o.error})")))
                continue
            delta, done, stop_hit = ro.update(o)
            if stop_hit:
                self.engine.abort(o.rid)
            if done is not None:
                del self.outputs[o.rid]
            events.append(Event(o.rid, delta, done, n_tokens=len(o.token_ids)))
        return events
