"""The request driver: prepared requests into the engine, text deltas and Completions out.

One driver serves both callers of the engine: the Python API (`LLM.run`, on the caller's thread) and the
server's front end (on its engine thread). It adds requests, steps the engine, turns each request's tokens into
text (incremental detokenisation, stop strings: `RequestOutput`), and aborts a request in the engine as soon as
its text hits a stop string. It is not thread-safe: one thread drives it.

A request with `params.n > 1` becomes n engine sequences (choices), reported under the request's id with their
`index`. Choice 0 goes in first; the others join once it has produced its first token, so that its prefilled
prompt blocks (and its image features) are in the prefix cache for them: they compute only the last block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from phi3v.engine.engine import Engine
from phi3v.output import Completion, RequestOutput, logprob_entries


class RequestError(RuntimeError):
    """The engine failed this request (not the caller's input): the other requests went on."""


@dataclass
class Event:
    rid: str
    delta: str = ""
    done: Completion | None = None  # set once per choice, when it finishes
    error: RequestError | None = None  # the request failed (then done is None)
    n_tokens: int = 0  # tokens generated in this step (text may lag behind: stop strings, partial characters)
    index: int = 0  # the choice (0 unless params.n > 1)
    logprobs: list[dict[str, Any]] | None = None  # this step's tokens' entries (Completion.logprobs' shape)


@dataclass
class _Choice:
    rid: str  # the request's id
    index: int
    t0: float


class RequestDriver:
    def __init__(self, engine: Engine, tokenizer: Any, eos_ids: list[int]) -> None:
        self.engine, self.tokenizer, self.eos_ids = engine, tokenizer, eos_ids
        self.outputs: dict[str, RequestOutput] = {}  # by engine sequence id
        self._choice: dict[str, _Choice] = {}  # engine sequence id -> its request and index
        self._members: dict[str, list[str]] = {}  # request id -> engine sequence ids of its choices (n > 1)
        self._deferred: dict[str, list[tuple[str, Any]]] = {}  # choice 0's id -> (id, PreparedRequest) waiting
        self._ready: list[tuple[str, Any]] = []  # to add at the next step

    def add(self, prep: Any, rid: str | None = None, t0: float | None = None) -> str:
        """Queue a PreparedRequest (phi3v.api). Raises ValueError if the engine refuses it."""
        t0 = time.perf_counter() if t0 is None else t0
        n = prep.params.n
        if n == 1:
            return self._add(prep, rid, _Choice("", 0, t0))
        # the choices share each image's crops and loader; only the last one admitted releases an image-cache pin
        # (the first would drop it before the others join, a step later)
        shared = [replace(img, release=None) for img in prep.images]
        first = type(prep)(prep.prompt_ids, shared, prep.params.for_choice(0), prep.preprocess_s)
        rid = self._add(first, rid, _Choice("", 0, t0))
        members = [rid] + [f"{rid}#{i}" for i in range(1, n)]
        self._members[rid] = members
        self._deferred[rid] = []
        for i in range(1, n):
            images = list(prep.images) if i == n - 1 else list(shared)
            p = type(prep)(prep.prompt_ids, images, prep.params.for_choice(i), prep.preprocess_s)
            self._choice[members[i]] = _Choice(rid, i, t0)
            self._deferred[rid].append((members[i], p))
        return rid

    def _add(self, prep: Any, rid: str | None, choice: _Choice) -> str:
        rid = self.engine.add_request(prep.prompt_ids, prep.images, prep.params, rid=rid)
        self._choice[rid] = _Choice(choice.rid or rid, choice.index, choice.t0)
        self.outputs[rid] = RequestOutput(self.tokenizer, len(prep.prompt_ids), prep.params, self.eos_ids,
                                          prep.preprocess_s, choice.t0)
        return rid

    def abort(self, rid: str) -> bool:
        """Stop a request, every choice of it (the client went away): its KV blocks are freed. False if it was
        not running."""
        found = False
        for sid in self._members.pop(rid, [rid]):
            self.outputs.pop(sid, None)
            self._choice.pop(sid, None)
            self._deferred.pop(sid, None)
            found = self.engine.abort(sid) or found
        self._ready = [(sid, p) for sid, p in self._ready if sid in self._choice]
        return found

    def has_unfinished(self) -> bool:
        return bool(self._ready) or self.engine.has_unfinished()

    def _release(self, sid: str) -> None:
        """Choice 0 has its first token (or ended): its siblings join at the next step."""
        self._ready.extend(self._deferred.pop(sid, ()))

    def _admit_ready(self) -> list[Event]:
        events = []
        ready, self._ready = self._ready, []
        for sid, prep in ready:
            c = self._choice[sid]
            try:
                self._add(prep, sid, c)
            except ValueError as e:  # not expected (choice 0 was accepted with the same prompt): fail the request
                self.abort(c.rid)
                events.append(Event(c.rid, error=RequestError(f"choice {c.index} was refused ({e})"), index=c.index))
        return events

    def step(self) -> list[Event]:
        """One engine step: an event for every choice that generated a token, finished or failed."""
        events = self._admit_ready()
        for o in self.engine.step():
            ro, c = self.outputs.get(o.rid), self._choice.get(o.rid)
            if ro is None or c is None:  # aborted since the step was scheduled
                self.engine.abort(o.rid)
                continue
            self._release(o.rid)
            if o.finish_reason == "error":
                self.abort(c.rid)
                events.append(Event(c.rid, error=RequestError(f"the engine failed on this request ({o.error})"),
                                    index=c.index))
                continue
            delta, done, stop_hit = ro.update(o)
            if stop_hit:
                self.engine.abort(o.rid)
            if done is not None:
                done.index = c.index
                del self.outputs[o.rid]
                del self._choice[o.rid]
                self._forget_member(c.rid, o.rid)
            lp = logprob_entries(o.logprobs) if ro.params.logprobs is not None else None
            events.append(Event(c.rid, delta, done, n_tokens=len(o.token_ids), index=c.index, logprobs=lp))
        return events

    def _forget_member(self, rid: str, sid: str) -> None:
        members = self._members.get(rid)
        if members is not None:
            members.remove(sid)
            if not members:
                del self._members[rid]
