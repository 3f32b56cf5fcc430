"""SamplingParams: how a request picks its tokens (validated on construction)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class SamplingParams:
    """How to pick the next tokens. temperature 0 means greedy."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # k most likely next tokens per generated token, from the raw logits
    stop_token_ids: list[int] = field(default_factory=list)
    json_schema: dict[str, Any] | str | None = None  # the output is JSON valid against this schema
    json_object: bool = False  # the output is a JSON object (any)
    # OpenAI semantics: logit -= presence * (count > 0) + frequency * count, count over the generated tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    n: int = 1  # independent answers to the same prompt (choice i > 0 of a seeded request: a seed derived from i)
    lora: str | None = None  # the per-request LoRA adapter, by the name it was loaded under (None: the base model)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not -1 <= self.top_k < 2**31:
            bad(f"top_k must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**63):
            bad(f"seed must be a 64-bit integer, got {self.seed!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0.0 < self.repetition_penalty <= 10.0:
            bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a non-empty string or a list of non-empty strings")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -2.0 <= v <= 2.0:
                bad(f"{name} must be a number in [-2, 2], got {v!r}")
        self._check_bias(bad)
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= 128:
            bad(f"n must be an integer in [1, 128], got {self.n!r}")
        if not isinstance(self.json_object, bool):
            bad(f"json_object must be true or false, got {self.json_object!r}")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            bad(f"lora must be an adapter's name (a non-empty string) or None, got {self.lora!r}")
        if self.json_schema is not None:
            if self.json_object:
                bad("set json_schema or json_object, not both")
            from phi3v.engine.grammar import check_schema

            try:
                self.json_schema = check_schema(self.json_schema)
            except ValueError as e:
                bad(str(e))

    def _check_bias(self, bad: Any) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            bad(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        if len(self.logit_bias) > 1024:
            bad(f"logit_bias may name at most 1024 tokens, got {len(self.logit_bias)}")
        for k, v in self.logit_bias.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                bad(f"logit_bias keys must be token ids (integers >= 0), got {k!r}")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -100.0 <= v <= 100.0:
                bad(f"logit_bias values must be numbers in [-100, 100], got {v!r} for token {k}")
        self.logit_bias = {k: float(v) for k, v in self.logit_bias.items()} or None

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError when logit_bias names a token past the model's vocabulary (known once the model is)."""
        if self.logit_bias and max(self.logit_bias) >= vocab_size:
            raise ValueError(f"logit_bias names token {max(self.logit_bias)}, past the vocabulary "
                             f"({vocab_size} tokens)")

    def for_choice(self, i: int) -> "SamplingParams":
        """The parameters of choice i of an n > 1 request: n=1; a given seed is kept by choice 0 and mixed with
        i for the others (distinct draws, reproducible; without a seed each choice draws its own from the OS)."""
        seed = self.seed
        if seed is not None and i > 0:
            digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
            seed = int.from_bytes(digest, "little") >> 1
        return replace(self, n=1, seed=seed)

    @property
    def plain_argmax(self) -> bool:
        """Greedy with nothing that changes the logits first: the sampler is one argmax."""
        return (self.greedy and self.repetition_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and not self.logit_bias)

    @property
    def counts_penalty(self) -> bool:
        """Presence or frequency penalty: needs the counts of the generated tokens."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def constrained(self) -> bool:
        """Whether the output must follow a JSON schema (or be a JSON object)."""
        return self.json_schema is not None or self.json_object

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
