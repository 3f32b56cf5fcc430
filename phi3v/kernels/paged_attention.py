"""Decode attention over the paged KV cache: a split-KV Triton kernel that also stores the new K/V.

One decode token per row attends over its own cached positions 0..L-1 (read through its block
table, so no row pays for another's length) plus the new token at position L, whose K/V comes in
registers and is written to the cache by the same kernel (no separate scatter launches). Given cos/sin,
the kernel also applies RoPE to q and the new k as it loads them (no separate RoPE launch), and under
programmatic dependent launch it reads its first KV tile before waiting for the kernel that made q/k/v.

Grid (rows, kv heads, NSPLIT): each program streams 1/NSPLIT of its row's tokens, TILE at a time,
for the query heads of its kv head, and keeps an online softmax (max m, sum l, weighted V acc) in
fp32; the last split adds the new token. With
NSPLIT > 1 a second kernel merges the partials. Two forms of the inner loop: tensor-core tl.dot (bf16/fp16/
fp32 caches, and GQA), and fp32 multiply-and-sum with per-lane softmax (fp8 caches with one query head per
kv head, as Phi-3 has: `_decode_fma`). NSPLIT is fixed per batch bucket (the grid must
not depend on lengths, so that a CUDA graph replays for any length): small batches split more, so
that batch 1 still puts ~16 programs per kv head on the GPU's 132 SMs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_start, pdl_trigger, pdl_wait
    from phi3v.kernels.fused import to_cache

    @triton.jit
    def _split_range(L, s, TILE: tl.constexpr, NSPLIT: tl.constexpr):
        # split s's positions [lo, hi) of 0..L-1: whole tiles each, the last ones shorter or empty
        per = tl.cdiv(tl.cdiv(L, TILE), NSPLIT) * TILE
        lo = s * per
        return lo, tl.minimum(lo + per, L)

    @triton.jit
    def _decode_fma(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, pacc_ptr, pml_ptr, cos_ptr, sin_ptr,
                    b, kvh, s, L, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t, sbt, so_b, so_h, scs, scale,
                    BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                    NSPLIT: tl.constexpr, FP8: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                    PDL: tl.constexpr, ROPE: tl.constexpr):
        # One query head per kv head, without tensor cores: products in fp32, and an online softmax per
        # token lane of the tile (running max m, sum l, weighted V rows), so that nothing is reduced across
        # threads inside the loop; the lanes merge once at the end. head_dim as two power-of-2 halves
        # (96 = 64 + 32): no masked lanes. For an fp8 cache this streams 2x the bytes/s of the tl.dot form,
        # which moves 8-bit tiles through shared memory into the MMA layouts (attention_variants.py).
        lo = tl.arange(0, D_LO)
        hi = D_LO + tl.arange(0, D_HI)
        hm = hi < D
        offs_t = tl.arange(0, TILE)
        bt_row = bt_ptr + b * sbt
        t_lo, t_hi = _split_range(L, s, TILE, NSPLIT)
        t = t_lo + offs_t
        tm = t < t_hi
        kl, kh, vl, vh = _kv_tile(kc_ptr, vc_ptr, bt_row, kvh * sc_h, sc_b, sc_t, t, tm, lo, hi, hm, BS)
        pdl_wait(PDL)  # the first tile is read before waiting (see _decode_kernel); q, k, v now
        qb = q_ptr + b * sq_b + kvh * sq_h
        q_lo = _load_rope(qb, lo, lo < D, cos_ptr + b * scs, sin_ptr + b * scs, D, ROPE).to(tl.float32)
        q_hi = _load_rope(qb, hi, hm, cos_ptr + b * scs, sin_ptr + b * scs, D, ROPE).to(tl.float32)
        m = tl.full((TILE,), float("-inf"), tl.float32)
        l = tl.zeros((TILE,), tl.float32)
        a_lo = tl.zeros((TILE, D_LO), tl.float32)
        a_hi = tl.zeros((TILE, D_HI), tl.float32)
        m, l, a_lo, a_hi = _fma_tile(kl, kh, vl, vh, tm, q_lo, q_hi, m, l, a_lo, a_hi, scale, FP8)
        for t0 in range(t_lo + TILE, t_hi, TILE):
            t = t0 + offs_t
            tm = t < t_hi
            kl, kh, vl, vh = _kv_tile(kc_ptr, vc_ptr, bt_row, kvh * sc_h, sc_b, sc_t, t, tm, lo, hi, hm, BS)
            m, l, a_lo, a_hi = _fma_tile(kl, kh, vl, vh, tm, q_lo, q_hi, m, l, a_lo, a_hi, scale, FP8)
        mx = tl.max(m, axis=0)  # merge the lanes; -inf when this split has no tokens
        w = tl.exp(m - tl.where(mx == float("-inf"), 0.0, mx))
        l = tl.sum(l * w, axis=0)
        o_lo = tl.sum(a_lo * w[:, None], axis=0)  # (D_LO,)
        o_hi = tl.sum(a_hi * w[:, None], axis=0)
        m = mx
        kb = kn_ptr + b * sk_b + kvh * sk_h
        vb = vn_ptr + b * sv_b + kvh * sv_h
        kn_lo = to_cache(_load_rope(kb, lo, lo < D, cos_ptr + b * scs, sin_ptr + b * scs, D, ROPE),
                         kc_ptr.dtype.element_ty, FP8)
        kn_hi = to_cache(_load_rope(kb, hi, hm, cos_ptr + b * scs, sin_ptr + b * scs, D, ROPE),
                         kc_ptr.dtype.element_ty, FP8)
        vn_lo = to_cache(tl.load(vb + lo), vc_ptr.dtype.element_ty, FP8)
        vn_hi = to_cache(tl.load(vb + hi, mask=hm, other=0.0), vc_ptr.dtype.element_ty, FP8)
        if s == NSPLIT - 1:  # the new token, as the cache holds it
            sn = (tl.sum(q_lo * _widen(kn_lo, FP8), axis=0) + tl.sum(q_hi * _widen(kn_hi, FP8), axis=0)) * scale
            m_new = tl.maximum(m, sn)
            p = tl.exp(sn - m_new)
            alpha = tl.exp(m - m_new)
            l = l * alpha + p
            o_lo = o_lo * alpha + p * _widen(vn_lo, FP8)
            o_hi = o_hi * alpha + p * _widen(vn_hi, FP8)
            m = m_new
        if s == 0:  # store the new K/V; no program reads position L from the cache
            phys = tl.load(bt_ptr + b * sbt + L // BS).to(tl.int64)
            dst = phys * sc_b + kvh * sc_h + (L % BS) * sc_t
            tl.store(kc_ptr + dst + lo, kn_lo)
            tl.store(kc_ptr + dst + hi, kn_hi, mask=hm)
            tl.store(vc_ptr + dst + lo, vn_lo)
            tl.store(vc_ptr + dst + hi, vn_hi, mask=hm)
        if NSPLIT == 1:
            ob = out_ptr + b * so_b + kvh * so_h
            tl.store(ob + lo, (o_lo / l).to(out_ptr.dtype.element_ty))
            tl.store(ob + hi, (o_hi / l).to(out_ptr.dtype.element_ty), mask=hm)
        else:
            row = (b * tl.num_programs(1) + kvh) * NSPLIT + s  # partial row (b, head, s)
            tl.store(pacc_ptr + row * BLOCK_D + lo, o_lo)
            tl.store(pacc_ptr + row * BLOCK_D + hi, o_hi, mask=hm)
            tl.store(pml_ptr + row * 2, m)
            tl.store(pml_ptr + row * 2 + 1, l)

    @triton.jit
    def _load_rope(base, d, dm, cos_row, sin_row, D: tl.constexpr, ROPE: tl.constexpr):
        # x[d] of one head (base: its row pointer(s), d: head_dim lanes), rotated by RoPE when ROPE:
        # x*cos + rotate_half(x)*sin, each product rounded to x's dtype, in kernels._rope_kernel's order
        x = tl.load(base + d, mask=dm, other=0.0)
        if ROPE:
            first = d < D // 2
            x2 = tl.load(base + tl.where(first, d + D // 2, d - D // 2), mask=dm, other=0.0).to(tl.float32)
            c = tl.load(cos_row + d, mask=dm, other=0.0).to(tl.float32)
            sn = tl.load(sin_row + d, mask=dm, other=0.0).to(tl.float32)
            dt = x.dtype
            x = ((x.to(tl.float32) * c).to(dt).to(tl.float32)
                 + (tl.where(first, -x2, x2) * sn).to(dt).to(tl.float32)).to(dt)
        return x

    @triton.jit
    def _fma_tile(kl, kh, vl, vh, tm, q_lo, q_hi, m, l, a_lo, a_hi, scale, FP8: tl.constexpr):
        # one tile of _decode_fma's loop: per-lane online softmax; a tile with no token in range changes nothing
        k_lo, k_hi, v_lo, v_hi = _widen(kl, FP8), _widen(kh, FP8), _widen(vl, FP8), _widen(vh, FP8)
        sc = tl.sum(k_lo * q_lo[None, :], axis=1) + tl.sum(k_hi * q_hi[None, :], axis=1)
        sc = tl.where(tm, sc * scale, float("-inf"))  # (TILE,)
        m_new = tl.maximum(m, sc)
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes with no token yet: exp(-inf) = 0, no NaN
        alpha = tl.exp(m - ms)
        p = tl.exp(sc - ms)
        l = l * alpha + p
        a_lo = a_lo * alpha[:, None] + p[:, None] * v_lo
        a_hi = a_hi * alpha[:, None] + p[:, None] * v_hi
        return m_new, l, a_lo, a_hi

    @triton.jit
    def _dot_tile(qd, k, v, tm, m, l, acc, scale, IEEE: tl.constexpr, FP8: tl.constexpr):
        # one tile of the tl.dot loop (the caller skips a tile with no token in range: its max would be -inf)
        if FP8:  # widened in registers (exactly: e4m3 fits fp16 and fp32)
            k = k.to(qd.dtype)
            v = v.to(qd.dtype)
        if IEEE:
            sc = tl.dot(qd, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(qd, tl.trans(k))
        sc = tl.where(tm[None, :], sc * scale, float("-inf"))  # (QR, TILE) fp32
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:  # P rounded to the activation dtype for the second product, as flash attention does
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    @triton.jit
    def _kv_full_tile(kc_ptr, vc_ptr, bt_row, head_off, sc_b, sc_t, t, tm, offs_d, dm, BS: tl.constexpr):
        # positions t (TILE,) of one row and kv head: K and V as (TILE, BLOCK_D), zero where out of range
        phys = tl.load(bt_row + t // BS, mask=tm, other=0).to(tl.int64)
        base = phys * sc_b + head_off + (t % BS) * sc_t  # (TILE,)
        msk = tm[:, None] & dm[None, :]
        return (tl.load(kc_ptr + base[:, None] + offs_d[None, :], mask=msk, other=0.0),
                tl.load(vc_ptr + base[:, None] + offs_d[None, :], mask=msk, other=0.0))

    @triton.jit
    def _kv_tile(kc_ptr, vc_ptr, bt_row, head_off, sc_b, sc_t, t, tm, lo, hi, hm, BS: tl.constexpr):
        # positions t (TILE,) of one row and kv head (tm: those in range), as stored: K and V, each as its
        # lo and hi halves
        phys = tl.load(bt_row + t // BS, mask=tm, other=0).to(tl.int64)
        base = (phys * sc_b + head_off + (t % BS) * sc_t)[:, None]  # (TILE, 1)
        mh = tm[:, None] & hm[None, :]
        return (tl.load(kc_ptr + base + lo[None, :], mask=tm[:, None], other=0.0),
                tl.load(kc_ptr + base + hi[None, :], mask=mh, other=0.0),
                tl.load(vc_ptr + base + lo[None, :], mask=tm[:, None], other=0.0),
                tl.load(vc_ptr + base + hi[None, :], mask=mh, other=0.0))

    @triton.jit
    def _widen(x, FP8: tl.constexpr):
        # e4m3 -> fp16 is one native conversion per two values (-> fp32 is not); both exact. (Moving the bits
        # into an fp32 by integer ops instead was 15 % slower on the H100; loading tile i+1 before computing
        # tile i, which Triton does not pipeline here, gained nothing: BENCHMARKS.md.)
        if FP8:
            x = x.to(tl.float16)
        return x.to(tl.float32)

    @triton.jit
    def _decode_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, out_ptr, pacc_ptr, pml_ptr,
                       cos_ptr, sin_ptr, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t, sbt, so_b, so_h, scs,
                       scale,
                       GROUP: tl.constexpr, QR: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, TILE: tl.constexpr, NSPLIT: tl.constexpr, IEEE: tl.constexpr,
                       FP8: tl.constexpr, PDL: tl.constexpr, FMA: tl.constexpr, D_LO: tl.constexpr,
                       D_HI: tl.constexpr, ROPE: tl.constexpr):
        # program (row b, kv head, split s): the GROUP query heads of this kv head are the rows of a
        # (QR >= 16, BLOCK_D) tile so that both products are tl.dot, whose operand loads Triton
        # software-pipelines (num_stages). For 16-bit caches this beats an FMA form; for fp8 with one query
        # head per kv head, _decode_fma (FMA) is faster, because 8-bit tiles reach the MMA layouts slowly.
        #
        # PDL: the first KV tile is read before waiting for the previous kernel (q, k, v come from it). Safe
        # because nothing read before the wait is written by this decode step's kernels: lengths and the
        # block table are inputs copied before the step, positions < L of the cache were written by earlier
        # steps, and each step starts with a kernel launched without PDL (the embedding lookup), which runs
        # only once all earlier work is done.
        pdl_trigger(PDL)
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        L = tl.load(len_ptr + b)  # cached positions 0..L-1; the new token sits at L
        if FMA:
            _decode_fma(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, pacc_ptr, pml_ptr, cos_ptr, sin_ptr,
                        b, kvh, s, L, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t, sbt, so_b, so_h, scs, scale,
                        BS, D, BLOCK_D, TILE, NSPLIT, FP8, D_LO, D_HI, PDL, ROPE)
            return
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        offs_t = tl.arange(0, TILE)
        bt_row = bt_ptr + b * sbt
        lo, hi = _split_range(L, s, TILE, NSPLIT)
        t = lo + offs_t
        tm = t < hi
        k0, v0 = _kv_full_tile(kc_ptr, vc_ptr, bt_row, kvh * sc_h, sc_b, sc_t, t, tm, offs_d, dm, BS)
        pdl_wait(PDL)
        offs_g = tl.arange(0, QR)
        heads = kvh * GROUP + offs_g
        gm = offs_g < GROUP
        cs_row, sn_row = cos_ptr + b * scs, sin_ptr + b * scs
        q = _load_rope(q_ptr + b * sq_b + heads[:, None] * sq_h, offs_d[None, :], gm[:, None] & dm[None, :],
                       cs_row, sn_row, D, ROPE)  # (QR, BLOCK_D)
        kn = _load_rope(kn_ptr + b * sk_b + kvh * sk_h, offs_d, dm, cs_row, sn_row, D, ROPE)
        vn = tl.load(vn_ptr + b * sv_b + kvh * sv_h + offs_d, mask=dm, other=0.0)
        qd = q
        if FP8:  # the new token as the cache will hold it (every position is read as stored)
            kn = to_cache(kn, kc_ptr.dtype.element_ty, FP8).to(q.dtype)
            vn = to_cache(vn, vc_ptr.dtype.element_ty, FP8).to(q.dtype)
            if not IEEE:  # half-precision dots in fp16: e4m3 -> fp16 is one native conversion per two values
                # (-> bf16 is not, and made the kernel compute-bound); q fits fp16's range after the clamp
                qd = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        m = tl.full((QR,), float("-inf"), tl.float32)
        l = tl.zeros((QR,), tl.float32)
        acc = tl.zeros((QR, BLOCK_D), tl.float32)
        if lo < hi:
            m, l, acc = _dot_tile(qd, k0, v0, tm, m, l, acc, scale, IEEE, FP8)
        for t0 in range(lo + TILE, hi, TILE):
            t = t0 + offs_t
            tm = t < hi
            k, v = _kv_full_tile(kc_ptr, vc_ptr, bt_row, kvh * sc_h, sc_b, sc_t, t, tm, offs_d, dm, BS)
            m, l, acc = _dot_tile(qd, k, v, tm, m, l, acc, scale, IEEE, FP8)
        if s == NSPLIT - 1:  # the new token, from registers
            sn = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * scale  # (QR,)
            m_new = tl.maximum(m, sn)
            p = tl.exp(sn - m_new)
            alpha = tl.exp(m - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
            m = m_new
        if s == 0:  # store the new K/V; no program reads position L from the cache
            phys = tl.load(bt_ptr + b * sbt + L // BS).to(tl.int64)
            dst = phys * sc_b + kvh * sc_h + (L % BS) * sc_t + offs_d
            tl.store(kc_ptr + dst, to_cache(kn, kc_ptr.dtype.element_ty, FP8), mask=dm)
            tl.store(vc_ptr + dst, to_cache(vn, vc_ptr.dtype.element_ty, FP8), mask=dm)
        _store_rows(acc, m, l, out_ptr, pacc_ptr, pml_ptr, b, s, heads, gm, offs_d, dm, so_b, so_h, GROUP, NSPLIT,
                    BLOCK_D)

    @triton.jit
    def _store_rows(acc, m, l, out_ptr, pacc_ptr, pml_ptr, b, s, heads, gm, offs_d, dm, so_b, so_h,
                    GROUP: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
        # the (QR, BLOCK_D) rows of _decode_kernel: the output when one split covers the whole cache, else this
        # split's partial (acc, m, l) for _merge_kernel
        if NSPLIT == 1:
            dst = out_ptr + b * so_b + heads[:, None] * so_h + offs_d[None, :]
            tl.store(dst, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
        else:
            row = (b * tl.num_programs(1) * GROUP + heads) * NSPLIT + s  # (QR,) partial rows (b, head, s)
            tl.store(pacc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=gm[:, None])
            tl.store(pml_ptr + row * 2, m, mask=gm)
            tl.store(pml_ptr + row * 2 + 1, l, mask=gm)

    @triton.jit
    def _merge_kernel(pacc_ptr, pml_ptr, out_ptr, so_b, so_h, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      NSPLIT: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        row0 = (b * tl.num_programs(1) + h) * NSPLIT
        offs_s = tl.arange(0, NSPLIT)
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.load(pml_ptr + (row0 + offs_s) * 2)  # (NSPLIT,), -inf for splits without tokens
        l = tl.load(pml_ptr + (row0 + offs_s) * 2 + 1)
        acc = tl.load(pacc_ptr + (row0 + offs_s)[:, None] * BLOCK_D + offs_d[None, :])  # (NSPLIT, BLOCK_D)
        mx = tl.max(m, axis=0)  # finite: the last split always holds the new token
        w = tl.exp(m - mx)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * so_b + h * so_h + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def num_splits(batch: int, n_kv_heads: int) -> int:
    """KV splits per (row, kv head), from the H100 sweep in benchmarks/attention_bench.py (32 kv heads,
    2.6k-token rows): 16 at batch 1, 8 up to batch 8, then fewer as rows alone fill the GPU; a power
    of two (the merge kernel's arange)."""
    programs = batch * n_kv_heads
    for limit, n in ((32, 16), (256, 8), (512, 4), (1536, 2)):
        if programs <= limit:
            return n
    return 1


# (tile, warps, stages) per KV storage, from H100 sweeps: bf16/fp16/fp32 the tl.dot form
# (benchmarks/attention_bench.py); fp8 the FMA form (benchmarks/attention_variants.py --real: 343 us per layer at
# batch 64 x 2.4k tokens against 359 with 4 warps, 321-328 against 328-370 in a later call; stages do not
# apply, its loads feed no tl.dot)
CONFIGS = {"bf16": (64, 4, 2), "fp8": (64, 2, 1)}


def parse_configs(raw: str) -> dict[str, tuple[int, int, int]]:
    """"bf16=64,4,2;fp8=128,4,3" -> (tile, warps, stages) per KV dtype: overrides of CONFIGS for tuning runs
    (`EngineConfig.attn_configs`, CLI environment PHI3V_ATTN_CONFIG)."""
    out = {}
    for part in filter(None, raw.split(";")):
        name, _, vals = part.partition("=")
        try:
            tile, warps, stages = (int(x) for x in vals.split(","))
        except ValueError:
            raise ValueError(f"attention config {raw!r}: expected e.g. 'bf16=64,4,2;fp8=64,4,2'") from None
        if name.strip() not in CONFIGS:
            raise ValueError(f"attention config {raw!r}: the KV dtype must be one of {', '.join(CONFIGS)}")
        out[name.strip()] = (tile, warps, stages)
    return out


def paged_decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                           block_table: Tensor, lengths: Tensor, nsplit: int,
                           config: tuple[int, int, int] | None = None,
                           rope: tuple[Tensor, Tensor] | None = None, pdl: bool = False) -> Tensor:
    """q (n, Hq, D), k/v (n, Hkv, D) new tokens (last dim contiguous); k_cache/v_cache one layer's
    (n_blocks, Hkv, BS, D), in q's dtype or fp8 e4m3; block_table (n, max_blocks) int32; lengths (n,) int64 cached tokens per
    row. Stores k/v at position lengths[b] and returns attention (n, Hq, D) with scale 1/sqrt(D).
    `rope`: (cos, sin), each (n, D) in q's dtype: q and k come unrotated and the kernel applies RoPE as it
    loads them (saving a kernel per layer); otherwise they come rotated."""
    n, hq, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    tile, num_warps, num_stages = config or CONFIGS["fp8" if fp8 else "bf16"]
    group = hq // hkv
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    out = torch.empty(n, hq, d, device=q.device, dtype=q.dtype)
    block_d = triton.next_power_of_2(d)
    fma = fp8 and group == 1  # see _decode_fma; bf16 streams as fast through the tl.dot form
    d_lo = 1 << ((d - 1).bit_length() - 1)  # the largest power of 2 below d (d > 1): 96 -> 64 + 32, 128 -> 64 + 64
    d_hi = triton.next_power_of_2(d - d_lo)
    if nsplit > 1:
        pacc = torch.empty(n * hq * nsplit, block_d, device=q.device, dtype=torch.float32)
        pml = torch.empty(n * hq * nsplit, 2, device=q.device, dtype=torch.float32)
    else:
        pacc = pml = out  # unused
    cos, sin = rope if rope is not None else (q, q)  # unused without rope
    assert rope is None or (cos.shape == sin.shape == (n, d) and cos.stride() == sin.stride() and cos.stride(1) == 1)
    _decode_kernel[(n, hkv, nsplit)](
        q, k, v, k_cache, v_cache, block_table, lengths, out, pacc, pml, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0), out.stride(0), out.stride(1),
        cos.stride(0), d ** -0.5, GROUP=group, QR=max(16, triton.next_power_of_2(group)), BS=bs, D=d, BLOCK_D=block_d,
        TILE=tile, NSPLIT=nsplit, IEEE=q.dtype == torch.float32, FP8=fp8, FMA=fma, D_LO=d_lo, D_HI=d_hi,
        ROPE=rope is not None, num_warps=num_warps, num_stages=num_stages, **pdl_args(q, pdl))
    if nsplit > 1:
        _merge_kernel[(n, hq)](pacc, pml, out, out.stride(0), out.stride(1), D=d, BLOCK_D=block_d, NSPLIT=nsplit,
                               num_warps=2, **pdl_args(q, pdl))
    return out
