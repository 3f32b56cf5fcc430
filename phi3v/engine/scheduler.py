"""The scheduler: which sequences run in the next step, which token ranges they compute, which blocks they use.

Pure Python (no torch), tested on the CPU alone. Each step is either a prefill step (chunks of prompts within
a token budget) or a decode step (one token for every sequence that is decoding); when both are wanted they
alternate, so that a long prompt, prefilled over several steps, does not stall everyone else's streaming.

KV memory is taken on demand: a sequence holds blocks for the tokens it has computed (plus, when free blocks
allow, `lookahead` positions ahead for the engine's run-ahead steps), not for its whole possible length. Admission is FIFO: a waiting sequence is admitted when a batch row is free
and the blocks of its first chunk are (after the prefix cache gave what it holds). When a running sequence
needs a block and none is free, the newest running sequence is preempted: its blocks go back (full prompt
blocks stay in the prefix cache, so its recompute is cheap) and it waits at the head of the queue, before
every request that arrived after it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from phi3v.engine.block_pool import BlockPool, block_hashes
from phi3v.engine.sequence import Sequence, Status


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # positions start..end-1 are computed in this step
    end: int

    @property
    def last(self) -> bool:
        """Whether this chunk ends the sequence's prefill (its last position's logits are sampled)."""
        return self.end == self.seq.num_tokens


@dataclass
class ScheduledBatch:
    prefills: list[PrefillChunk] = field(default_factory=list)  # a prefill step
    decodes: list[Sequence] = field(default_factory=list)  # a decode step: row i is decodes[i]

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int, num_blocks: int, block_size: int, *,
                 max_prefill_tokens: int = 16384, enable_prefix_caching: bool = True, lookahead: int = 0,
                 long_rope_after: int | None = None) -> None:
        """lookahead: decode positions held beyond the current one when blocks are free (the engine's run-ahead
        steps need them; they never cause a preemption);
        long_rope_after: a sequence longer than this uses the long LongRoPE factors (None: one regime)."""
        if max_num_seqs < 1 or max_model_len < 2 or block_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_num_seqs must be >= 1, max_model_len >= 2, block_size and max_prefill_tokens >= 1")
        if num_blocks * block_size < max_model_len:
            raise ValueError(f"{num_blocks} KV blocks of {block_size} tokens do not hold one sequence of "
                             f"{max_model_len} tokens")
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.block_size, self.max_prefill_tokens, self.lookahead = block_size, max_prefill_tokens, lookahead
        self.long_rope_after = long_rope_after
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.watermark = max(1, num_blocks // 100)  # blocks kept free at admission for running sequences to grow
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; decode rows follow it
        self.seqs: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._last_prefill = False

    # ---------------------------------------------------------------- requests
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
        seq.arrival = next(self._arrivals)
        seq.status = Status.WAITING
        self.seqs[seq.rid] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and give its blocks back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._drop_blocks(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.seqs.pop(seq.rid, None)

    def get(self, rid: str) -> Sequence | None:
        return self.seqs.get(rid)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def all_free(self) -> bool:
        """Nothing running and every KV block free (cached contents may stay)."""
        return not self.running and self.pool.num_free == self.pool.num_blocks

    @property
    def kv_usage(self) -> float:
        return self.pool.usage

    # ---------------------------------------------------------------- the step's plan
    def schedule(self) -> ScheduledBatch:
        """The next step: decode after a prefill step when someone decodes, else prefill work when there is
        some, else decode."""
        decoding = any(s.decoding for s in self.running)
        if decoding and (self._last_prefill or not self.has_prefill_work()):
            batch = self._schedule_decode()
            if batch:
                self._last_prefill = False
                return batch
        batch = self._schedule_prefill()
        if batch:
            self._last_prefill = True
            return batch
        self._last_prefill = False
        return self._schedule_decode()

    def has_prefill_work(self) -> bool:
        """A running sequence with tokens left to prefill, or a waiting one that would be admitted now."""
        return any(not s.decoding for s in self.running) or (
            bool(self.waiting) and len(self.running) < self.max_num_seqs and self._admission(self.waiting[0]) is not None)

    def _schedule_decode(self) -> ScheduledBatch:
        rows = [s for s in self.running if s.decoding]
        for s in rows:
            if self._crosses_long_rope(s):
                self._restart(s)  # recomputed with the long factors by the next prefill step
        for s in sorted(rows, key=lambda q: q.arrival):
            if s.decoding and not self._grow(s, s.num_tokens):  # this step writes position num_tokens - 1
                break
        if self.lookahead:  # blocks ahead (for run-ahead steps) only from what is free: they never preempt
            for s in self.running:
                ahead = self.blocks_for(min(s.num_tokens + self.lookahead, s.max_len)) - len(s.blocks)
                if s.decoding and 0 < ahead <= self.pool.num_free - self.watermark:
                    s.blocks += self.pool.allocate(ahead)
        return ScheduledBatch(decodes=[s for s in self.running if s.decoding])

    def _schedule_prefill(self) -> ScheduledBatch:
        budget = self.max_prefill_tokens
        chunks: list[PrefillChunk] = []
        for s in list(self.running):
            if budget == 0:
                break
            if s.status is not Status.RUNNING or s.decoding:
                continue
            n = min(s.num_tokens - s.num_computed, budget)
            if not self._grow(s, s.num_computed + n):
                continue
            chunks.append(PrefillChunk(s, s.num_computed, s.num_computed + n))
            budget -= n
        while budget and self.waiting and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            plan = self._admission(s)
            if plan is None:
                break
            hits = plan
            self.waiting.popleft()
            self.pool.take(hits)
            start = len(hits) * self.block_size
            n = min(s.num_tokens - start, budget)
            s.blocks = hits + self.pool.allocate(self.blocks_for(start + n) - len(hits))
            s.num_computed, s.num_registered = start, len(hits)
            s.status = Status.RUNNING
            self.running.append(s)
            if not s.output_ids:  # a first admission: what the prefix cache gave of the prompt (usage, hit rate)
                s.num_cached = start
                self.pool.hits += start
                self.pool.queries += s.num_tokens
            chunks.append(PrefillChunk(s, start, start + n))
            budget -= n
        return ScheduledBatch(prefills=chunks)

    def _admission(self, s: Sequence) -> list[int] | None:
        """The prefix-cache hits of `s` if it can be admitted now (they and its first chunk's blocks fit), else None."""
        hits = self._cached_prefix(s, self.long_rope_after is not None and s.num_tokens > self.long_rope_after)
        start = len(hits) * self.block_size
        need = self.blocks_for(start + min(s.num_tokens - start, self.max_prefill_tokens)) - len(hits)
        free = self.pool.num_free - sum(1 for b in hits if self.pool.refs[b] == 0)
        return hits if need + (self.watermark if self.running else 0) <= free else None

    def _cached_prefix(self, s: Sequence, long_rope: bool) -> list[int]:
        """The blocks of the longest cached prefix of s's tokens in the given LongRoPE regime (not taken yet); at
        least the last token is left to compute, its logits give the next token."""
        if long_rope != s.long_rope or len(s.block_hashes) < s.num_tokens // self.block_size:
            s.long_rope = long_rope
            s.block_hashes = block_hashes(s.all_ids, [i.key for i in s.images], self.block_size, long_rope,
                                          s.params.lora) \
                if self.pool.enable_caching else []
        return self.pool.lookup(s.block_hashes[: (s.num_tokens - 1) // self.block_size])

    # ---------------------------------------------------------------- blocks
    def _grow(self, s: Sequence, n_tokens: int) -> bool:
        """Hold blocks for positions 0..n_tokens-1 of s, preempting the newest running sequences when none
        are free. False when s itself was preempted."""
        need = self.blocks_for(n_tokens) - len(s.blocks)
        while need > self.pool.num_free:
            victim = max(self.running, key=lambda q: q.arrival)
            self.preempt(victim)
            if victim is s:
                return False
        if need > 0:
            s.blocks += self.pool.allocate(need)
        return True

    def preempt(self, s: Sequence) -> None:
        """Take s's blocks back; it waits at the head of the queue and is recomputed when admitted again."""
        self.running.remove(s)
        self._drop_blocks(s)
        s.status, s.prefilled = Status.WAITING, False
        s.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(s)

    def _restart(self, s: Sequence) -> None:
        """Recompute s from position 0 in the long LongRoPE regime (its length passed long_rope_after): the
        keys of every position change, so its blocks are given back and new ones filled."""
        self._drop_blocks(s)
        s.prefilled = False
        hits = self._cached_prefix(s, True)
        self.pool.take(hits)
        s.blocks, s.num_computed, s.num_registered = hits, len(hits) * self.block_size, len(hits)

    def _crosses_long_rope(self, s: Sequence) -> bool:
        return self.long_rope_after is not None and not s.long_rope and s.num_tokens > self.long_rope_after

    def _drop_blocks(self, s: Sequence) -> None:
        self.pool.release(s.blocks)
        s.blocks, s.num_computed, s.num_registered = [], 0, 0
        s.blocks_epoch += 1

    def computed(self, chunk: PrefillChunk) -> None:
        """A prefill chunk ran: its positions are in the cache; full blocks join the prefix cache."""
        s = chunk.seq
        s.num_computed = chunk.end
        s.prefilled = chunk.last
        full = min(chunk.end // self.block_size, len(s.block_hashes))
        for i in range(s.num_registered, full):
            self.pool.register(s.blocks[i], s.block_hashes[i])
        s.num_registered = max(s.num_registered, full)
