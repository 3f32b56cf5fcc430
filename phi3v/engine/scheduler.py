"""Request bookkeeping: waiting and running queues, KV blocks, finish and abort.

Pure Python (no torch), so it is tested on the CPU alone. The KV cache is paged: a sequence owns
a list of fixed-size blocks. At admission it reserves blocks for its whole possible length,
min(prompt + max_tokens, max_model_len), so a running sequence never waits for memory and
nothing is ever preempted; admission is FIFO and stops at the first request whose blocks are
not free. Finishing (or aborting) returns the blocks at once.
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
    max_len: int = 0  # prompt + generated tokens may not exceed this (its reserved KV)
    output_ids: list[int] = field(default_factory=list)
    status: str = WAITING
    blocks: list[int] = field(default_factory=list)  # block table: position p is in blocks[p // block_size]
    finish_reason: str | None = None
    long_rope: bool = False  # regime of the keys in this sequence's cache
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # engine-private per-sequence data

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

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


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int, num_blocks: int, block_size: int) -> None:
        if max_num_seqs < 1 or max_model_len < 2 or block_size < 1:
            raise ValueError("max_num_seqs must be >= 1, max_model_len >= 2 and block_size >= 1")
        if num_blocks * block_size < max_model_len:
            raise ValueError(f"{num_blocks} KV blocks of {block_size} tokens do not hold one sequence of "
                             f"{max_model_len} tokens")
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; row i of a decode batch
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def add(self, seq: Sequence) -> None:
        if seq.rid in self.seqs:
            raise ValueError(f"request id {seq.rid!r} is already in use")
        if len(seq.prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(seq.prompt_ids)} tokens, but the context holds {self.max_model_len} "
                "(prompt plus at least one generated token): use fewer or smaller images (num_crops) or a shorter prompt")
        seq.max_len = min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len)
        seq.status = WAITING
        self.seqs[seq.rid] = seq
        self.waiting.append(seq)

    def admit(self, limit: int | None = None) -> list[Sequence]:
        """Move waiting sequences to running (FIFO) while their blocks and a batch row are free."""
        admitted: list[Sequence] = []
        while self.can_admit() and (limit is None or len(admitted) < limit):
            seq = self.waiting.popleft()
            seq.blocks = [self.free_blocks.pop() for _ in range(self.blocks_for(seq.max_len))]
            seq.status = RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and return its blocks."""
        if seq.status == RUNNING:
            self.running.remove(seq)
            self.free_blocks.extend(reversed(seq.blocks))
            seq.blocks = []
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = FINISHED, reason
        self.seqs.pop(seq.rid, None)

    def get(self, rid: str) -> Sequence | None:
        return self.seqs.get(rid)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def free_slots(self) -> int:
        """Batch rows free for admission (memory permitting)."""
        return self.max_num_seqs - len(self.running)

    @property
    def all_free(self) -> bool:
        """Nothing running and every KV block back in the free list."""
        return not self.running and len(self.free_blocks) == self.num_blocks

    @property
    def kv_usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def can_admit(self) -> bool:
        """Would `admit` take the head of the queue now?"""
        return bool(self.waiting) and len(self.running) < self.max_num_seqs and \
            self.blocks_for(self.waiting[0].max_len) <= len(self.free_blocks)
