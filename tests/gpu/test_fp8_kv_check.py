"""GPU check of the fp8 (e4m3) KV cache kernels at Phi-3-vision's shapes (32 kv heads, head_dim 96, 64-token
blocks, bf16 activations): the Triton decode kernel against the torch gather fallback on the same inputs
(attention within bf16 rounding; the stored new K/V byte for byte, i.e. the GPU's fp8 conversion rounds as
torch's cast does), and the prefill KV store against torch's cast, saturation at +-448 included.

On the GPU machine: python -m pytest -m gpu tests/gpu/test_fp8_kv_check.py
PHI3V_FP8_KV_SMALL=1: fewer heads and tokens, fp32 (the script's former --small). The CPU interpreter's
version of these checks is tests/test_paged_attention.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from phi3v.engine.kv_cache import FP8, DecodeAttention, KVCache
from phi3v.kernels.paged_attention import num_splits
from phi3v.kernels import fused as kernels

pytestmark = pytest.mark.gpu


@dataclass
class Shapes:
    heads: int
    head_dim: int
    block_size: int
    n_blocks: int
    lengths: list[int]
    dtype: torch.dtype


@pytest.fixture(scope="module")
def shapes() -> Shapes:
    if os.environ.get("PHI3V_FP8_KV_SMALL", "") not in ("", "0"):
        return Shapes(4, 96, 16, 64, [0, 37, 16 * 5 + 3, 16 * 12 - 1], torch.float32)
    return Shapes(32, 96, 64, 400, [0, 700, 2500, 2447, 64, 1], torch.bfloat16)


def _random_cache(s: Shapes, g: torch.Generator) -> KVCache:
    cache = KVCache(1, s.n_blocks, s.block_size, s.heads, s.head_dim, "cuda", s.dtype, FP8)
    cache.k.copy_((torch.randn(cache.k.shape, device="cuda", generator=g) * 3).to(FP8))
    cache.v.copy_(torch.randn(cache.v.shape, device="cuda", generator=g).to(FP8))
    return cache


def test_fp8_decode_kernel_equals_the_gather_fallback(shapes: Shapes, report) -> None:
    s, dev = shapes, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    cache = _random_cache(s, g)
    lengths = torch.tensor(s.lengths, device=dev)
    n = lengths.numel()
    width = int(lengths.max()) + 1
    per = -(-width // s.block_size)
    bt = torch.randperm(s.n_blocks, device=dev, generator=g)[: n * per].view(n, per).int()
    q = torch.randn(n, s.heads, 1, s.head_dim, device=dev, dtype=s.dtype, generator=g)
    k = torch.randn(n, s.heads, 1, s.head_dim, device=dev, dtype=s.dtype, generator=g) * 3
    v = torch.randn(n, s.heads, 1, s.head_dim, device=dev, dtype=s.dtype, generator=g)
    k[1, 0, 0, 5] = 1000.0  # saturates
    before = (cache.k.clone(), cache.v.clone())
    cache.triton = False
    ref = DecodeAttention(cache, lengths, bt, width)(0, q, k, v).float()
    want = (cache.k.view(torch.uint8).clone(), cache.v.view(torch.uint8).clone())
    res = {}
    for nsplit in sorted({1, 4, num_splits(n, s.heads)}):
        cache.k.copy_(before[0])
        cache.v.copy_(before[1])
        cache.triton = True
        got = DecodeAttention(cache, lengths, bt, width, nsplit)(0, q, k, v).float()
        same = bool(torch.equal(cache.k.view(torch.uint8), want[0]) and torch.equal(cache.v.view(torch.uint8), want[1]))
        res[nsplit] = {"rel_err": float((got - ref).norm() / ref.norm()), "stored_equal": same,
                       "nan": bool(got.isnan().any())}
    report({"decode": res})
    assert [ns for ns, r in res.items() if not (r["rel_err"] < 1e-2 and r["stored_equal"] and not r["nan"])] == []


def test_fp8_prefill_store_rounds_and_saturates_as_torch_casts(shapes: Shapes, report) -> None:
    s, dev = shapes, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    cache = _random_cache(s, g)
    kk = torch.randn(500, s.heads, s.head_dim, device=dev, dtype=s.dtype, generator=g) * 100
    vv = torch.randn(500, s.heads, s.head_dim, device=dev, dtype=s.dtype, generator=g)
    pos = torch.randperm(s.n_blocks * s.block_size, device=dev, generator=g)[:500]
    blk, off = pos // s.block_size, pos % s.block_size
    kernels.store_kv(kk, vv, cache.k[0], cache.v[0], blk, off)
    k_equal = torch.equal(cache.k[0][blk, :, off].view(torch.uint8),
                          kk.float().clamp(-448, 448).to(FP8).view(torch.uint8))
    v_equal = torch.equal(cache.v[0][blk, :, off].view(torch.uint8), vv.float().to(FP8).view(torch.uint8))
    report({"store_k_equal": k_equal, "store_v_equal": v_equal})
    assert k_equal and v_equal
