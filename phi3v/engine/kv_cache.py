"""Paged KV cache, and the attention backends (prefill, batched prefill, decode) the decoder calls.

Layout: one K and one V tensor of shape (n_layers, n_blocks + 1, n_kv_heads, block_size, head_dim).
A sequence owns a list of blocks (its block table; the scheduler hands them out); position p of
the sequence lives in block table[p // block_size] at offset p % block_size. Rows of a decode
batch attend over their own lengths only: no padding to the longest sequence, no compaction.
The extra last block is scratch: padding rows of a captured decode graph write there.

The cache may be stored in fp8 (e4m3, opt-in, `kv_dtype`): half the bytes per token, so twice the
tokens fit, and decode attention streams half the bytes (1.6x faster at batch 64: BENCHMARKS.md). Values are saturated to +-448 (e4m3's range) and rounded on the way in, and widened
on the way out. A prefill's tokens attend to each other at full precision; a decode step reads every
position from the cache, its own new token included. Outputs are then no longer the reference's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ContextManager

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from phi3v.engine.config import KV_CACHE_DTYPES
from phi3v.kernels import available, paged_attention, paged_prefill
from phi3v.kernels.fused import store_kv
from phi3v.models.phi3 import attention, causal_attention


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value; a plain cast of anything beyond gives NaN



def kv_storage_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for a `kv_cache_dtype` option: "auto" = the model's dtype (exact),
    "fp8" = e4m3 (half the KV bytes, changed numerics)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")
    return FP8 if name == "fp8" else dtype


def to_cache_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in the cache's dtype (saturated to e4m3's range when that is fp8)."""
    if dtype == FP8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


class KVCache:
    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> None:
        """dtype: the activations'; kv_dtype: the storage's (default: dtype; or FP8)."""
        shape = (n_layers, n_blocks + 1, n_kv_heads, block_size, head_dim)
        self.dtype, self.kv_dtype = dtype, kv_dtype or dtype
        if self.kv_dtype not in (dtype, FP8):
            raise ValueError(f"KV cache dtype {self.kv_dtype} is neither the model's {dtype} nor fp8 (e4m3)")
        self.k = torch.zeros(shape, device=device, dtype=self.kv_dtype)
        self.v = torch.zeros(shape, device=device, dtype=self.kv_dtype)
        self.n_blocks, self.block_size, self.scratch = n_blocks, block_size, n_blocks
        # the Triton decode kernel on CUDA (and in Triton's CPU interpreter, for tests)
        self.triton = available(self.k.device)

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        # K and V, every layer: 32*2*32*96*2 B = 384 KiB for Phi-3-vision in bf16
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def slots(self, blocks: list[int], start: int, end: int) -> Tensor:
        """(2, end-start) int64 on the CPU: cache slot (block id, offset) of positions start..end-1 of a sequence
        with block table `blocks` (tensor math: a prompt has thousands of positions, and the engine
        thread builds them while preparation threads want the GIL)."""
        p = torch.arange(start, end)
        return torch.stack([torch.tensor(blocks, dtype=torch.long)[p // self.block_size], p % self.block_size])

    def write(self, layer: int, blk: Tensor, off: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v (N, n_kv, D) at (blk[i], off[i])."""
        if self.triton:
            store_kv(k, v, self.k[layer], self.v[layer], blk, off)
            return
        self.k[layer][blk, :, off] = to_cache_dtype(k, self.kv_dtype)
        self.v[layer][blk, :, off] = to_cache_dtype(v, self.kv_dtype)

    def read(self, layer: int, blk: Tensor, off: Tensor) -> tuple[Tensor, Tensor]:
        """K, V at (blk[i], off[i]) as (n_kv, N, D) each, in the activation dtype."""
        k, v = self.k[layer][blk, :, off], self.v[layer][blk, :, off]
        return k.transpose(0, 1).to(self.dtype), v.transpose(0, 1).to(self.dtype)


# For attention shapes that change from call to call: FlashAttention first. cuDNN, PyTorch's first choice on
# Hopper, builds a graph for every new shape (~65 ms each on the H200; flash has no such cost and is ~20 % slower
# warm at 2,300 tokens: benchmarks/cold_shapes.py). The graphs' fixed shapes keep the default.
FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def flash_first(q: Tensor, on: bool = True) -> ContextManager:
    """The SDPA backend order for a prefill whose shape varies (CUDA only; elsewhere nothing changes)."""
    if not on or q.device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(FLASH_FIRST, set_priority=True)


@dataclass(frozen=True)
class PrefillKernelOptions:
    """Which prefill chunks take the paged prefill kernel, and its tile configs (from EngineConfig)."""

    mode: str = "past"  # past | all | off: see paged_prefill.MODES
    configs: dict[str, paged_prefill.PrefillConfig] = field(default_factory=dict)  # per KV storage


class PrefillAttention:
    """One sequence, T new tokens at positions start..start+T-1 (blk/off: their places in the cache).
    Attends over positions 0..start+T-1 (chunked prefill when start > 0; `past` = (blk, off) of 0..start-1)."""

    def __init__(self, cache: KVCache, blk: Tensor, off: Tensor, start: int,
                 past: tuple[Tensor, Tensor] | None = None, vary: bool = False,
                 kernel: PrefillKernelOptions | None = None) -> None:
        self.cache, self.blk, self.off, self.start, self.past = cache, blk, off, start, past
        self.vary = vary  # a shape not captured in a graph: see FLASH_FIRST
        self.kernel = kernel or PrefillKernelOptions()
        self._table: Tensor | None = None  # see _whole_table

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q (1, n_heads, T, D); k, v (1, n_kv, T, D)
        c = self.cache
        c.write(layer, self.blk, self.off, k[0].transpose(0, 1), v[0].transpose(0, 1))
        if c.triton and paged_prefill.use_kernel(self.kernel.mode, self.start):  # reads the past in place (no gather)
            bt = self.past[0][:: c.block_size] if self.start else self.blk[:1]  # the block table: blocks of 0, bs, ..
            key = paged_prefill.config_key(q, c.k)
            cfg = self.kernel.configs.get(key) or paged_prefill.CONFIGS[key]
            kt, vt = k[0].transpose(0, 1), v[0].transpose(0, 1)
            if cfg.variant == "gluon" and _gluon_applies(q[0].transpose(0, 1), c.k[layer], cfg):
                bt, kt, vt = self._whole_table(), None, None  # every key from the cache: the chunk's blocks too
            o = paged_prefill.paged_prefill_attention(q[0].transpose(0, 1), c.k[layer], c.v[layer], bt, self.start,
                                                      kt, vt, config=cfg)
            return o.transpose(0, 1)[None]
        if self.start == 0:
            with flash_first(q, self.vary):
                return causal_attention(q, k, v)
        pk, pv = self.cache.read(layer, *self.past)  # (n_kv, s, D)
        kc = torch.cat([pk[None], k], 2)  # (1, n_kv, s+T, D)
        vc = torch.cat([pv[None], v], 2)
        # query i sits at position s+i and sees keys 0..s+i: causal, aligned to the last key. As a bias object,
        # not a boolean mask: flash / memory-efficient kernels take it, where a mask went to cuDNN, which builds
        # a graph for every new shape (~65 ms; a prompt of two 16-crop images has its second chunk here)
        with flash_first(q, self.vary):
            return attention(q, kc, vc, causal_lower_right(q.shape[2], kc.shape[2]))

    def _whole_table(self) -> Tensor:
        # blocks of positions 0, bs, 2 bs, .. up to start+T-1 (the same for every layer: built once per chunk)
        if self._table is None:
            pos = torch.cat([self.past[0], self.blk]) if self.start else self.blk
            self._table = pos[:: self.cache.block_size]
        return self._table


class SuffixAttention:
    """One sequence's new tokens after its cached prefix, padded to a graph bucket: token i at (blk[i], off[i]);
    lens (2,) int32 on the device = [start, T] (real tokens; padding follows them). Stores the new K/V, then the
    paged prefill kernel attends over the past in place and over the real new keys, causally, reading start and
    T on the device: one CUDA graph per bucket serves every prefix length. Triton only (CUDA, or the
    interpreter)."""

    def __init__(self, cache: KVCache, blk: Tensor, off: Tensor, table: Tensor, lens: Tensor) -> None:
        self.cache, self.blk, self.off, self.table, self.lens = cache, blk, off, table, lens

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q (1, n_heads, Tb, D); k, v (1, n_kv, Tb, D)
        c = self.cache
        kt, vt = k[0].transpose(0, 1), v[0].transpose(0, 1)  # (Tb, n_kv, D)
        c.write(layer, self.blk, self.off, kt, vt)
        cfg = paged_prefill.suffix_config(q.shape[2], q.dtype, c.k.dtype)
        o = paged_prefill.paged_prefill_attention(q[0].transpose(0, 1), c.k[layer], c.v[layer], self.table,
                                                  self.lens, kt, vt, config=cfg)
        return o.transpose(0, 1)[None]


class BatchPrefillAttention:
    """Several sequences' whole prompts at once, padded to T. `rows` holds the flat indices b*T+t of
    the real tokens; only they are stored, at (blk, off). Causal attention over the new tokens is
    exact for every real query: padding only follows the real tokens."""

    def __init__(self, cache: KVCache, rows: Tensor, blk: Tensor, off: Tensor) -> None:
        self.cache, self.rows, self.blk, self.off = cache, rows, blk, off

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q (B, n_heads, T, D); k, v (B, n_kv, T, D); an integer gather (a boolean mask would sync)
        kk = k.transpose(1, 2).flatten(0, 1).index_select(0, self.rows)  # (N, n_kv, D)
        vv = v.transpose(1, 2).flatten(0, 1).index_select(0, self.rows)
        self.cache.write(layer, self.blk, self.off, kk, vv)
        with flash_first(q):  # (B, T) follows how requests arrive together
            return causal_attention(q, k, v)


@dataclass(frozen=True)
class DecodeKernelOptions:
    """Launch options of the decode-attention kernel (from EngineConfig)."""

    pdl: bool = False
    attn_configs: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # per KV dtype: bf16 / fp8

    def config(self, fp8: bool) -> tuple[int, int, int] | None:
        return self.attn_configs.get("fp8" if fp8 else "bf16")


class DecodeAttention:
    """n rows, one new token each: row b's token goes to position lengths[b] (a device tensor) of the
    sequence with block table block_table[b] (n, max_blocks) int32. `width`: host-side bound on
    lengths+1, used only by the gather fallback (the Triton kernel reads each row's own length). `kernel`: the
    Triton kernel's launch options (tile config, PDL)."""

    def __init__(self, cache: KVCache, lengths: Tensor, block_table: Tensor, width: int, nsplit: int = 1,
                 kernel: DecodeKernelOptions | None = None) -> None:
        self.cache, self.lengths, self.block_table, self.width, self.nsplit = cache, lengths, block_table, width, nsplit
        self.kernel = kernel or DecodeKernelOptions()
        self.fused_rope = cache.triton  # the kernel can rotate q and k itself (see AttentionBackend)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # q (n, n_heads, 1, D); k, v (n, n_kv, 1, D) -> (n, n_heads, 1, D); rope: (cos, sin) (n, D) when q, k
        # come unrotated (only with fused_rope)
        c = self.cache
        if c.triton:
            o = paged_attention.paged_decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], c.k[layer], c.v[layer],
                                                       self.block_table, self.lengths, self.nsplit, rope=rope,
                                                       config=self.kernel.config(c.kv_dtype == FP8),
                                                       pdl=self.kernel.pdl)
            return o[:, :, None]
        if rope is not None:
            raise ValueError("unrotated q/k (rope=...) need the Triton kernel: check fused_rope first")
        # gather fallback: the rows' blocks as a padded (n, n_kv, width, D) view, masked per row
        bs = c.block_size
        rows = torch.arange(q.shape[0], device=q.device)
        blk = self.block_table[rows, self.lengths // bs].long()  # (n,) the new token's block
        c.k[layer][blk, :, self.lengths % bs] = to_cache_dtype(k[:, :, 0], c.kv_dtype)
        c.v[layer][blk, :, self.lengths % bs] = to_cache_dtype(v[:, :, 0], c.kv_dtype)
        nb = (self.width + bs - 1) // bs
        bt = self.block_table[:, :nb].long()
        kk = c.k[layer][bt].transpose(1, 2).flatten(2, 3).to(q.dtype)  # (n, n_kv, nb*bs, D)
        vv = c.v[layer][bt].transpose(1, 2).flatten(2, 3).to(q.dtype)
        mask = (torch.arange(nb * bs, device=q.device)[None, :] <= self.lengths[:, None])[:, None, None, :]
        return attention(q, kk, vv, mask)


def _gluon_applies(q: Tensor, k_cache: Tensor, cfg: paged_prefill.PrefillConfig) -> bool:
    from phi3v.kernels import prefill_gluon  # only when asked for: an experimental Triton dialect

    return prefill_gluon.applies(q, k_cache, cfg)
