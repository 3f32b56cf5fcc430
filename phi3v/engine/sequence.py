"""Sequence: one request inside the engine, from `add_request` to its finish.

Owned by the scheduler (queues, blocks, progress) and read by the model runner (tokens, features, blocks);
`commit` appends its tokens. Positions 0..num_computed-1 have their K/V in `blocks` (block i holds positions
i*block_size .. (i+1)*block_size-1); the rest are computed by prefill chunks, or, once only the last token is
left, by decode steps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from phi3v.engine.images import ImageInput
from phi3v.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # in the queue (new, or preempted: its blocks were taken back)
    RUNNING = "running"  # holds a batch row and blocks: prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: compared by identity, never field by field
class Sequence:
    rid: str
    prompt_ids: list[int]  # image placeholders are negative (-k for image k)
    params: SamplingParams
    images: list[ImageInput] = field(default_factory=list)
    eos_ids: frozenset[int] = frozenset()
    seed: int = 0
    max_len: int = 0  # prompt + generated tokens may not exceed this (max_tokens, the context)
    arrival: int = 0  # order of add_request: the newest running sequence is preempted first
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why the engine failed this sequence (finish_reason "error")
    # ---- KV (scheduler)
    blocks: list[int] = field(default_factory=list)  # block table: only appended to, until dropped whole
    blocks_epoch: int = 0  # +1 each time `blocks` is dropped (preemption, LongRoPE restart, finish)
    num_computed: int = 0  # positions whose K/V is in `blocks`
    prefilled: bool = False  # its (re)computation is done: every step now decodes its last token
    num_cached: int = 0  # prompt tokens found in the prefix cache at its (last) admission
    num_registered: int = 0  # leading blocks already offered to the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of full blocks, in the current regime
    long_rope: bool = False  # LongRoPE regime of the keys in `blocks` (long factors once past original_max)
    num_preemptions: int = 0
    lora: int = 0  # per-request LoRA adapter: its row index in the model's LoraSet (0 = the base model)
    # ---- model runner
    features: list[torch.Tensor] | None = None  # projected image features (n_tokens, hidden), held while alive
    embeds: torch.Tensor | None = None  # (num_tokens - embeds_from, hidden) while prefilling in several chunks
    embeds_from: int = 0  # the position of embeds' first row
    grammar: Any = None  # structured output: the request's grammar matcher
    seen: torch.Tensor | None = None  # (vocab,) bool on the device: tokens seen (repetition penalty)
    counts: torch.Tensor | None = None  # (vocab,) float32 on the device: generated tokens' counts (presence/frequency)

    def __post_init__(self) -> None:
        # 1 + the position of the last image placeholder (0: none): past it a prefill needs no image features
        self.image_end = next((len(self.prompt_ids) - i for i, t in enumerate(reversed(self.prompt_ids)) if t < 0), 0)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def decoding(self) -> bool:
        """Prefilled: the next forward feeds its last sampled token (a decode step)."""
        return self.status is Status.RUNNING and self.prefilled

    def check_finish(self) -> str | None:
        """After appending a token: eos, max_tokens or the context being full."""
        if not self.output_ids:
            return None
        last = self.output_ids[-1]
        if not self.params.ignore_eos and (last in self.eos_ids or last in self.params.stop_token_ids):
            return "stop"
        if len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_len:
            return "length"
        return None
