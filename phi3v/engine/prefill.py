"""Decoder prefill of scheduled chunks into their sequences' KV blocks.

A chunk that is a whole prompt from position 0 goes through `prefill_many`: prompts of similar length batched
into one padded forward, or one short prompt replayed as a CUDA graph of its length bucket. Any other chunk (a
prompt after a prefix-cache hit, a later part of a long prompt) runs eagerly in pieces of at most `long_chunk` tokens,
each attending over the sequence's cached positions. Every path returns the last position's logits of the
chunks that end their sequence's prefill; sampling and bookkeeping stay with the caller. Cache slots and padding
indices are built as CPU tensors and copied once per forward.
"""

from __future__ import annotations

import torch

from phi3v.device import to_device
from phi3v.engine.graphs import PrefillRunner, SuffixRunner
from phi3v.engine.kv_cache import BatchPrefillAttention, KVCache, PrefillAttention, PrefillKernelOptions
from phi3v.engine.sequence import Sequence


class Prefiller:
    def __init__(self, model: torch.nn.Module, cache: KVCache, runner: PrefillRunner, chunk: int,
                 stats: dict, kernel: PrefillKernelOptions | None = None, long_chunk: int | None = None,
                 suffix: SuffixRunner | None = None) -> None:
        """chunk: the longest prompt batched or replayed whole; long_chunk: tokens per forward of a longer one;
        suffix: replays a short suffix after a cached prefix as a CUDA graph."""
        self.model, self.cache, self.runner, self.chunk, self.stats = model, cache, runner, chunk, stats
        self.suffix = suffix
        self.long_chunk = long_chunk or chunk
        self.kernel = kernel or PrefillKernelOptions()
        self.device = cache.k.device

    def prefill_range(self, seq: Sequence, embeds: torch.Tensor, start: int, want_logits: bool) -> torch.Tensor | None:
        """Run the decoder over `embeds` (T, hidden), positions start..start+T-1 of seq, into its blocks
        (positions 0..start-1 are cached). Returns the last position's logits (1, V) when asked."""
        T = embeds.shape[0]
        dev = self.device
        flag = to_device(torch.tensor([seq.long_rope]), dev)
        lora = self._lora([seq])
        self.stats["prefill_tokens"] += T
        if start == 0 and self.runner.bucket(T) is not None and T <= self.chunk:
            where = to_device(self.cache.slots(seq.blocks, 0, T), dev)  # (2, T)
            logits = self.runner.run(embeds, flag, where[0], where[1], lora)
            if logits is not None:
                return logits
        if start > 0 and self.suffix is not None and self.suffix.bucket(T) is not None:
            logits = self._suffix(seq, embeds, start, flag)
            if logits is not None:
                self.stats["suffix_graphs"] = self.stats.get("suffix_graphs", 0) + 1
                return logits if want_logits else None
        h = None
        for s in range(start, start + T, self.long_chunk):
            x = embeds[s - start: s - start + self.long_chunk][None]  # (1, t, hidden)
            e = s + x.shape[1]
            pos = torch.arange(s, e, device=dev)[None]
            where = to_device(self.cache.slots(seq.blocks, 0, e), dev)  # (2, e): [:s] past, [s:] new
            attn = PrefillAttention(self.cache, where[0, s:], where[1, s:], s,
                                    (where[0, :s], where[1, :s]) if s else None,
                                    vary=True, kernel=self.kernel)  # vary: every prompt length is a new shape
            h = self.model(x, pos, flag, attn, lora)
        return self.model.logits(h[:, -1]) if want_logits else None

    def _suffix(self, seq: Sequence, embeds: torch.Tensor, start: int, flag: torch.Tensor) -> torch.Tensor | None:
        T = embeds.shape[0]
        rows = torch.cat([torch.arange(start, start + T)[None], self.cache.slots(seq.blocks, start, start + T)])
        table = torch.full((self.suffix.max_blocks,), self.cache.scratch, dtype=torch.int32)
        table[: len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        return self.suffix.run(embeds, to_device(rows, self.device), flag, to_device(table, self.device))

    def _lora(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """(B,) int64 on the device, each row's per-request LoRA adapter; None when none are loaded."""
        if self.model.loras is None:
            return None
        return to_device(torch.tensor([s.lora for s in seqs], dtype=torch.long), self.device)

    def prefill_many(self, seqs: list[Sequence], embs: list[torch.Tensor]) -> torch.Tensor:
        """Whole prompts from position 0, batching prompts of similar length into one padded forward
        (short prompts are launch-bound one at a time). Returns last-position logits (n, V)."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: embs[i].shape[0])
        group: list[int] = []

        def flush() -> None:
            if len(group) == 1:
                i = group[0]
                out[i] = self.prefill_range(seqs[i], embs[i], 0, True)
            elif group:
                for i, lg in zip(group, self.prefill_batch([seqs[i] for i in group], [embs[i] for i in group])):
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

    def prefill_batch(self, seqs: list[Sequence], embs: list[torch.Tensor]) -> torch.Tensor:
        """Whole prompts of several sequences in one forward, zero-padded at the end to the longest.
        Returns last-position logits (B, V)."""
        lens = [e.shape[0] for e in embs]
        T = max(lens)
        x = embs[0].new_zeros(len(seqs), T, embs[0].shape[1])  # (B, T, hidden)
        for b, e in enumerate(embs):
            x[b, : e.shape[0]] = e
        dev = self.device
        pos = torch.arange(T, device=dev)[None].expand(len(seqs), T)
        # flat index b*T+t of each real token, and its cache slot: (3, sum(lens)), one copy
        where = torch.cat([torch.cat([torch.arange(i * T, i * T + n)[None], self.cache.slots(s.blocks, 0, n)])
                           for i, (s, n) in enumerate(zip(seqs, lens))], 1)
        where = to_device(where, dev)
        attn = BatchPrefillAttention(self.cache, where[0], where[1], where[2])
        h = self.model(x, pos, to_device(torch.tensor([s.long_rope for s in seqs]), dev), attn, self._lora(seqs))
        last = h[torch.arange(len(seqs), device=dev), to_device(torch.tensor(lens) - 1, dev)]  # (B, hidden)
        self.stats["prefill_tokens"] += sum(lens)
        self.stats["batched_prefills"] += 1
        return self.model.logits(last)
