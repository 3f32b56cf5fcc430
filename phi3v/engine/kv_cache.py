"""KV cache in fixed slots, and the attention backends (prefill, batched prefill, decode) the decoder calls.

Layout: one K and one V tensor of shape (n_layers, n_slots, n_kv_heads, slot_len, head_dim).
Running sequences always occupy slots 0..n-1 (the scheduler compacts by moving the last slot into
a freed one), so a decode batch of n rows is a plain view `[:, :n, :, :max_len]` with per-row
lengths: no gather, no padding to the longest sequence beyond the bucketed `max_len` view.
"""

from __future__ import annotations

import torch

from phi3v.models.phi3 import attention, causal_attention


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, slot_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layers, n_slots, n_kv_heads, slot_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots, self.slot_len = n_slots, slot_len

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        # K and V, every layer: 32*2*32*96*2 B = 384 KiB for Phi-3-vision in bf16
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions into slot dst (compaction after a finish)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class PrefillAttention:
    """One sequence, T new tokens written at positions start..start+T-1 of its slot.
    Attends over the slot's first start+T positions (chunked prefill when start > 0)."""

    def __init__(self, cache: KVCache, slot: int, start: int) -> None:
        self.cache, self.slot, self.start = cache, slot, start

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (1, n_heads, T, D); k, v (1, n_kv, T, D)
        T, s = q.shape[2], self.start
        kc = self.cache.k[layer, self.slot, :, : s + T]  # (n_kv, s+T, D)
        vc = self.cache.v[layer, self.slot, :, : s + T]
        kc[:, s:] = k[0]
        vc[:, s:] = v[0]
        if s == 0:
            return causal_attention(q, k, v)
        # query i sits at position s+i and sees keys 0..s+i
        qpos = torch.arange(s, s + T, device=q.device)[:, None]
        mask = torch.arange(s + T, device=q.device)[None, :] <= qpos  # (T, s+T)
        return attention(q, kc[None], vc[None], mask)


class DecodeAttention:
    """n rows, one new token each, row b in slot b at position lengths[b] (device tensor, no sync).
    `max_len` is a host-side bound on lengths+1 (bucketed), the width of the attended view."""

    def __init__(self, cache: KVCache, lengths: torch.Tensor, max_len: int) -> None:
        self.cache, self.lengths, self.max_len = cache, lengths, max_len
        n = lengths.shape[0]
        self.rows = torch.arange(n, device=lengths.device)
        # (n, 1, 1, max_len): row b sees positions 0..lengths[b]
        self.mask = (torch.arange(max_len, device=lengths.device)[None, :] <= lengths[:, None])[:, None, None, :]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (n, n_heads, 1, D); k, v (n, n_kv, 1, D)
        n = q.shape[0]
        kl, vl = self.cache.k[layer], self.cache.v[layer]  # (n_slots, n_kv, slot_len, D)
        kl[self.rows, :, self.lengths] = k[:, :, 0]
        vl[self.rows, :, self.lengths] = v[:, :, 0]
        return attention(q, kl[:n, :, : self.max_len], vl[:n, :, : self.max_len], self.mask)


class BatchPrefillAttention:
    """Several sequences' whole prompts at once, padded to T: row b is written to slot slots[b] at
    positions 0..T-1 (padding positions past its length hold garbage that the sequence overwrites
    as it decodes, and that no mask ever shows). Causal attention over the new tokens is exact for
    every real query: padding only follows the real tokens."""

    def __init__(self, cache: KVCache, slots: torch.Tensor) -> None:
        self.cache, self.slots = cache, slots

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (B, n_heads, T, D); k, v (B, n_kv, T, D)
        T = q.shape[2]
        self.cache.k[layer, self.slots, :, :T] = k
        self.cache.v[layer, self.slots, :, :T] = v
        return causal_attention(q, k, v)
