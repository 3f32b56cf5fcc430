"""Decoder prefill of admitted sequences into their KV blocks: one prompt (a captured length bucket,
else eager, in chunks of `chunk` tokens), or prompts of similar length batched into one padded forward.

Every path returns the last prompt position's logits; sampling and bookkeeping stay in the engine.
Cache places and padding indices are built as CPU tensors and copied once per forward.
"""

from __future__ import annotations

import torch

from phi3v.engine.kv_cache import BatchPrefillAttention, KVCache, PrefillAttention
from phi3v.engine.runner import PrefillRunner
from phi3v.engine.scheduler import Sequence
from phi3v.device import to_device


class Prefiller:
    def __init__(self, model: torch.nn.Module, cache: KVCache, runner: PrefillRunner, chunk: int,
                 stats: dict) -> None:
        self.model, self.cache, self.runner, self.chunk, self.stats = model, cache, runner, chunk, stats
        self.device = cache.k.device

    def prefill_one(self, seq: Sequence, embeds: torch.Tensor, long_rope: bool) -> torch.Tensor:
        """Run the decoder over `embeds` (T, hidden) into seq's blocks from position 0; return the
        last position's logits (1, V)."""
        T = embeds.shape[0]
        dev = self.device
        flag = to_device(torch.tensor([long_rope]), dev)
        seq.long_rope = long_rope
        self.stats["prefill_tokens"] += T
        if self.runner.bucket(T) is not None and T <= self.chunk:
            where = to_device(self.cache.positions(seq.blocks, 0, T), dev)  # (2, T)
            logits = self.runner.run(embeds, flag, where[0], where[1])
            if logits is not None:
                return logits
        h = None
        for s in range(0, T, self.chunk):
            x = embeds[s: s + self.chunk][None]
            e = s + x.shape[1]
            pos = torch.arange(s, e, device=dev)[None]
            where = to_device(self.cache.positions(seq.blocks, 0, e), dev)  # (2, e): [:s] past, [s:] new
            attn = PrefillAttention(self.cache, where[0, s:], where[1, s:], s,
                                    (where[0, :s], where[1, :s]) if s else None,
                                    vary=True)  # every prompt length is a new shape
            h = self.model(x, pos, flag, attn)
        return self.model.logits(h[:, -1])

    def prefill_many(self, seqs: list[Sequence], embs: list[torch.Tensor], longs: list[bool]) -> torch.Tensor:
        """Prefill admitted sequences, batching prompts of similar length into one padded forward
        (short prompts are launch-bound one at a time). Returns last-position logits (n, V)."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: embs[i].shape[0])
        group: list[int] = []

        def flush() -> None:
            if len(group) == 1:
                i = group[0]
                out[i] = self.prefill_one(seqs[i], embs[i], longs[i])
            elif group:
                for i, lg in zip(group, self.prefill_batch([seqs[i] for i in group], [embs[i] for i in group],
                                                           [longs[i] for i in group])):
                    out[i] = lg[None]  # (1, V)
            group.clear()

        for i in order:
            T = embs[i].shape[0]
            # pad at most 25 % and keep the padded batch within one prefill chunk's worth of tokens
            if group and ((len(group) + 1) * T > self.chunk or T > 1.25 * embs[group[0]].shape[0]):
                flush()
            group.append(i)
        flush()
        return torch.cat(out, 0)  # type: ignore[arg-type]

    def prefill_batch(self, seqs: list[Sequence], embs: list[torch.Tensor], longs: list[bool]) -> torch.Tensor:
        """Whole prompts of several sequences in one forward, zero-padded at the end to the longest.
        Returns last-position logits (B, V)."""
        lens = [e.shape[0] for e in embs]
        T = max(lens)
        x = embs[0].new_zeros(len(seqs), T, embs[0].shape[1])  # (B, T, hidden)
        for b, e in enumerate(embs):
            x[b, : e.shape[0]] = e
        dev = self.device
        pos = torch.arange(T, device=dev)[None].expand(len(seqs), T)
        # flat index b*T+t of each real token, and its cache place: (3, sum(lens)), one copy
        where = torch.cat([torch.cat([torch.arange(i * T, i * T + n)[None], self.cache.positions(s.blocks, 0, n)])
                           for i, (s, n) in enumerate(zip(seqs, lens))], 1)
        where = to_device(where, dev)
        attn = BatchPrefillAttention(self.cache, where[0], where[1], where[2])
        h = self.model(x, pos, to_device(torch.tensor(longs), dev), attn)
        last = h[torch.arange(len(seqs), device=dev), to_device(torch.tensor(lens) - 1, dev)]  # (B, hidden)
        for s, lr in zip(seqs, longs):
            s.long_rope = lr
        self.stats["prefill_tokens"] += sum(lens)
        self.stats["batched_prefills"] += 1
        return self.model.logits(last)
