"""Engine step outputs -> text deltas and a Completion, per request.

Shared by the synchronous API and the server's async front end: incremental detokenisation,
stop strings (held back until they can no longer start a stop string), usage, logprobs, timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from phi3v.engine.engine import StepOutput


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, Any]  # prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details.cached_tokens
    logprobs: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    index: int = 0  # which choice of an n > 1 request this is


def logprob_entries(lp: list[Any]) -> list[dict[str, Any]]:
    """The engine's (token id, logprob, [(id, logprob)...]) tuples -> Completion.logprobs entries."""
    return [{"token_id": t, "logprob": v, "top_logprobs": [{"token_id": a, "logprob": b} for a, b in top]}
            for t, v, top in lp]


class StopChecker:
    """Finds stop strings in the growing text and holds back a tail that could start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1

    def check(self, text: str, searched_from: int) -> tuple[int, bool]:
        """Returns (how many chars of text may be shown, whether a stop string was hit)."""
        if not self.stops:
            return len(text), False
        start = max(0, searched_from - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            return min(hits), True
        return max(searched_from, len(text) - self.hold), False


class RequestOutput:
    """Turns one request's StepOutputs into (delta, Completion | None).

    `update` returns `stop_hit=True` when a stop string ended the request early: the caller must
    then abort it in the engine."""

    def __init__(self, tokenizer: Any, prompt_len: int, params: Any, eos_ids: list[int],
                 preprocess_s: float = 0.0, t0: float | None = None) -> None:
        from phi3v.processing.tokenizer import IncrementalDetokenizer

        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = StopChecker(params.stop)
        self.params, self.prompt_len, self.eos = params, prompt_len, set(eos_ids)
        self.preprocess_s = preprocess_s
        self.t0 = t0 if t0 is not None else time.perf_counter()
        self.ids: list[int] = []
        self.lp: list[Any] = []
        self.shown = 0
        self.first: float | None = None
        self.cached = 0  # prompt tokens the engine's prefix cache supplied
        self.done: Completion | None = None

    def update(self, o: StepOutput) -> tuple[str, Completion | None, bool]:
        self.first = self.first or time.perf_counter()
        self.ids.extend(o.token_ids)
        self.lp.extend(o.logprobs)
        self.cached = max(self.cached, o.cached_tokens)
        searched = len(self.detok.text)
        for tok in o.token_ids:
            if tok not in self.eos or self.params.ignore_eos:
                self.detok.push(tok)
        finished, reason = o.finished, o.finish_reason
        if finished:
            self.detok.flush()
        text = self.detok.text
        upto, hit = self.stop.check(text, searched)
        stop_hit = hit and not finished
        if hit:
            finished, reason = True, "stop"
        elif finished:
            upto = len(text)
        delta = text[self.shown: upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        if finished:
            self.done = self._completion(text[:upto], reason)
        return delta, self.done, stop_hit

    def _completion(self, text: str, reason: str | None) -> Completion:
        now = time.perf_counter()
        n_gen = len(self.ids)
        first = self.first or now
        decode_s = now - first
        lp = None
        if self.params.logprobs is not None:
            lp = logprob_entries(self.lp)
        return Completion(
            text=text, token_ids=list(self.ids), finish_reason=reason,
            usage={"prompt_tokens": self.prompt_len, "completion_tokens": n_gen, "total_tokens": self.prompt_len + n_gen,
                   "prompt_tokens_details": {"cached_tokens": self.cached}},
            logprobs=lp,
            timings={"preprocess_s": self.preprocess_s, "ttft_s": first - self.t0 + self.preprocess_s,
                     "total_s": now - self.t0 + self.preprocess_s,
                     "decode_tokens_per_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0})
