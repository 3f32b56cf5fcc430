"""Request bookkeeping: waiting and running queues, slot assignment, finish and abort.

Pure Python (no torch), so it is tested on the CPU alone. Running sequences always hold slots
0..n-1: when one leaves, the sequence in the last slot moves into its slot, and the move is
returned for the engine to apply to the KV cache.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)  # a request is itself: compared by identity, never field by field
class Sequence:
    rid: str
    prompt_ids: list[int]  # image placeholders are negative (-k for image k)
    params: Any  # SamplingParams
    images: list[Any] = field(default_factory=list)  # per image: (crops, image_size) or cached features
    eos_ids: frozenset[int] = frozenset()
    max_len: int = 0  # prompt + generated tokens may not exceed this (the slot length)
    output_ids: list[int] = field(default_factory=list)
    status: str = WAITING
    slot: int = -1
    finish_reason: str | None = None
    long_rope: bool = False  # regime of the keys in this sequence's cache
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # engine-private per-sequence data

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def check_finish(self) -> str | None:
        """After appending a token: eos, max_tokens or the slot being full."""
        if not self.output_ids:
            return None
        last = self.output_ids[-1]
        if not self.params.ignore_eos and (last in self.eos_ids or last in self.params.stop_token_ids):
            return "stop"
        if len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_len:
            return "length"
        return None


class Scheduler:
    def __init__(self, max_num_seqs: int, slot_len: int) -> None:
        if max_num_seqs < 1 or slot_len < 2:
            raise ValueError("max_num_seqs must be >= 1 and slot_len >= 2")
        self.max_num_seqs, self.slot_len = max_num_seqs, slot_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].slot == i
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add(self, seq: Sequence) -> None:
        if seq.rid in self.seqs:
            raise ValueError(f"request id {seq.rid!r} is already in use")
        if len(seq.prompt_ids) >= self.slot_len:
            raise ValueError(
                f"prompt is {len(seq.prompt_ids)} tokens, but the context holds {self.slot_len} "
                "(prompt plus at least one generated token): use fewer or smaller images (num_crops) or a shorter prompt")
        seq.max_len = self.slot_len
        seq.status = WAITING
        self.seqs[seq.rid] = seq
        self.waiting.append(seq)

    def admit(self, limit: int | None = None) -> list[Sequence]:
        """Move waiting sequences into free slots (FIFO), at most `limit` of them."""
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_num_seqs and (limit is None or len(admitted) < limit):
            seq = self.waiting.popleft()
            seq.status, seq.slot = RUNNING, len(self.running)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence, reason: str) -> tuple[int, int, int] | None:
        """Mark finished and free its slot. Returns (src_slot, dst_slot, length) when the last
        running sequence was moved into the freed slot, for the engine to copy its KV."""
        move = None
        if seq.status == RUNNING:
            i = seq.slot
            last = self.running.pop()
            if last is not seq:
                self.running[i] = last
                move = (last.slot, i, last.num_tokens)
                last.slot = i
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.slot = FINISHED, reason, -1
        self.seqs.pop(seq.rid, None)
        return move

    def get(self, rid: str) -> Sequence | None:
        return self.seqs.get(rid)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def free_slots(self) -> int:
        return self.max_num_seqs - len(self.running)
