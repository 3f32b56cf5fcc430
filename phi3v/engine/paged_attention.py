"""Decode attention over the paged KV cache: a split-KV Triton kernel that also stores the new K/V.

One decode token per row attends over its own cached positions 0..L-1 (read through its block
table, so no row pays for another's length) plus the new token at position L, whose K/V comes in
registers and is written to the cache by the same kernel (no separate scatter launches).

Grid (rows, q heads, NSPLIT): each program streams 1/NSPLIT of its row's blocks and keeps an
online softmax (max m, sum l, weighted V acc) in fp32; the last split adds the new token. With
NSPLIT > 1 a second kernel merges the partials. NSPLIT is fixed per batch bucket (the grid must
not depend on lengths, so that a CUDA graph replays for any length): small batches split more, so
that batch 1 still puts ~16 programs per head on the GPU's 132 SMs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.models.kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, out_ptr, pacc_ptr, pml_ptr,
                       sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t, sbt, so_b, so_h, scale,
                       GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       NSPLIT: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.program_id(2)
        kvh = h // GROUP
        L = tl.load(len_ptr + b)  # cached positions 0..L-1; the new token sits at L
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        offs_t = tl.arange(0, BS)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_d, mask=dm, other=0.0).to(tl.float32) * scale
        kn = tl.load(kn_ptr + b * sk_b + kvh * sk_h + offs_d, mask=dm, other=0.0)
        vn = tl.load(vn_ptr + b * sv_b + kvh * sv_h + offs_d, mask=dm, other=0.0)
        n_blk = tl.cdiv(L, BS)
        per = tl.cdiv(n_blk, NSPLIT)
        lo = s * per
        hi = tl.minimum(lo + per, n_blk)
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for i in range(lo, hi):
            phys = tl.load(bt_ptr + b * sbt + i).to(tl.int64)
            base = phys * sc_b + kvh * sc_h + offs_t[:, None] * sc_t + offs_d[None, :]
            tm = (i * BS + offs_t) < L
            msk = tm[:, None] & dm[None, :]
            k = tl.load(kc_ptr + base, mask=msk, other=0.0).to(tl.float32)  # (BS, BLOCK_D)
            sc = tl.sum(k * q[None, :], axis=1)
            sc = tl.where(tm, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            p = tl.exp(sc - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(vc_ptr + base, mask=msk, other=0.0).to(tl.float32)
            l = l * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        if s == NSPLIT - 1:  # the new token, from registers
            sn = tl.sum(kn.to(tl.float32) * q, axis=0)
            m_new = tl.maximum(m, sn)
            p = tl.exp(sn - m_new)
            alpha = tl.exp(m - m_new)
            l = l * alpha + p
            acc = acc * alpha + p * vn.to(tl.float32)
            m = m_new
        if s == 0:
            if h % GROUP == 0:  # one program per kv head stores the new K/V; no program reads position L
                phys = tl.load(bt_ptr + b * sbt + L // BS).to(tl.int64)
                dst = phys * sc_b + kvh * sc_h + (L % BS) * sc_t + offs_d
                tl.store(kc_ptr + dst, kn, mask=dm)
                tl.store(vc_ptr + dst, vn, mask=dm)
        if NSPLIT == 1:
            tl.store(out_ptr + b * so_b + h * so_h + offs_d, (acc / l).to(out_ptr.dtype.element_ty), mask=dm)
        else:
            row = (b * tl.num_programs(1) + h) * NSPLIT + s
            tl.store(pacc_ptr + row * BLOCK_D + offs_d, acc)
            tl.store(pml_ptr + row * 2, m)
            tl.store(pml_ptr + row * 2 + 1, l)

    @triton.jit
    def _merge_kernel(pacc_ptr, pml_ptr, out_ptr, so_b, so_h, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      NSPLIT: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        row0 = (b * tl.num_programs(1) + h) * NSPLIT
        offs_s = tl.arange(0, NSPLIT)
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.load(pml_ptr + (row0 + offs_s) * 2)  # (NSPLIT,), -inf for splits without blocks
        l = tl.load(pml_ptr + (row0 + offs_s) * 2 + 1)
        acc = tl.load(pacc_ptr + (row0 + offs_s)[:, None] * BLOCK_D + offs_d[None, :])  # (NSPLIT, BLOCK_D)
        mx = tl.max(m, axis=0)  # finite: the last split always holds the new token
        w = tl.exp(m - mx)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * so_b + h * so_h + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def num_splits(batch: int, n_heads: int) -> int:
    """Splits per (row, head): ~512 programs in all, at most 16 (a power of two, for the merge)."""
    n = 1
    while n < 16 and batch * n_heads * n * 2 <= 512:
        n *= 2
    return n


def paged_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                           block_table: Tensor, lengths: Tensor, nsplit: int) -> Tensor:
    """q (n, Hq, D), k/v (n, Hkv, D) new tokens (last dim contiguous); k_cache/v_cache one layer's
    (n_blocks, Hkv, BS, D); block_table (n, max_blocks) int32; lengths (n,) int64 cached tokens per
    row. Stores k/v at position lengths[b] and returns attention (n, Hq, D) with scale 1/sqrt(D)."""
    n, hq, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    out = torch.empty(n, hq, d, device=q.device, dtype=q.dtype)
    block_d = triton.next_power_of_2(d)
    if nsplit > 1:
        pacc = torch.empty(n * hq * nsplit, block_d, device=q.device, dtype=torch.float32)
        pml = torch.empty(n * hq * nsplit, 2, device=q.device, dtype=torch.float32)
    else:
        pacc = pml = out  # unused
    _decode_kernel[(n, hq, nsplit)](
        q, k, v, k_cache, v_cache, block_table, lengths, out, pacc, pml,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0), out.stride(0), out.stride(1),
        d ** -0.5, GROUP=hq // hkv, BS=bs, D=d, BLOCK_D=block_d, NSPLIT=nsplit, num_warps=4)
    if nsplit > 1:
        _merge_kernel[(n, hq)](pacc, pml, out, out.stride(0), out.stride(1), D=d, BLOCK_D=block_d, NSPLIT=nsplit,
                               num_warps=2)
    return out
