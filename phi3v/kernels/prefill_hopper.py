"""A Hopper variant of the paged prefill attention (phi3v/kernels/paged_prefill.py): K/V tiles through TMA.

Same contract and grid as `_prefill_kernel` (one sequence's chunk of T queries over its paged past, read in
place, plus the chunk's own keys from the layer's K/V tensors; one program = BLOCK_M queries of one head),
selected per PrefillConfig (`variant="tma"`). What differs is how a key tile reaches shared memory and how the
softmax is spent:
- K/V tiles come by TMA (`cp.async.bulk.tensor`) through tensor descriptors made on the device: the cache of
  one layer viewed 2-D, (n_blocks * Hkv * BS, D) rows of D, so that the 64 tokens of one block of one kv head
  are one box of consecutive rows; the chunk's K/V per kv head, (T, D) rows at stride sk_t. No per-element
  address arithmetic, no masks; the copy engine writes the swizzled layout wgmma reads.
- A key tile of BLOCK_N = 2 x BS tokens spans two cache blocks (two block-table entries): it is loaded as two
  sub-tiles of BS rows and attended as one (one max, one rescale of the accumulator per BLOCK_N keys).
- head_dim 96 either as two boxes (64 + 32 columns: no multiply-adds on padding) or, with `pad`, one box of
  128 columns that TMA zero-fills past D (one wgmma chain per product, a third more tensor-core work).
- The softmax works in log2 units with the scale folded into one FMA per score: p = exp2(s * c - m), where m
  is the running maximum already in scaled units.
No warp specialization: `tl.range(..., warp_specialize=True)` leaves these loops as they are on sm90 in Triton
3.6 and 3.9 (benchmarks/prefill_compile.py: no partitions, no setmaxnreg); FA3's producer / ping-pong consumer
warpgroups would need Gluon's explicit `warp_specialize`.
Only the causal diagonal tiles mask; past tiles mask only the last, partial one (TMA reads the whole block
there; positions >= start are masked in the softmax).

Not for: an fp8 cache, the chunk's K/V read from the cache (k/v None), `start` on the device (CUDA graphs of
SuffixAttention), K/V that TMA cannot address (`applies`): paged_prefill_attention sends those to `_prefill_kernel`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_start
    from phi3v.kernels.paged_prefill import _load_rows, _mm, launch_args

    @triton.jit
    def _box(d_lo, d_hi, row, HAS_HI: tl.constexpr, D_LO: tl.constexpr):
        # one box of rows row.. in the activation dtype: columns 0..D_LO-1 and D_LO..D_LO+D_HI-1
        lo = d_lo.load([row, 0])
        hi = lo
        if HAS_HI:
            hi = d_hi.load([row, D_LO])
        return lo, hi

    @triton.jit
    def _scores(q_lo, q_hi, k_lo, k_hi, keep, MASK: tl.constexpr, HAS_HI: tl.constexpr, IEEE: tl.constexpr):
        # (BLOCK_M, R) raw scores q . k; -inf where not keep (only when MASK)
        s = _mm(q_lo, tl.trans(k_lo), tl.zeros((q_lo.shape[0], k_lo.shape[0]), tl.float32), IEEE)
        if HAS_HI:
            s = _mm(q_hi, tl.trans(k_hi), s, IEEE)
        if MASK:
            s = tl.where(keep, s, float("-inf"))
        return s

    @triton.jit
    def _pv(p, v_lo, v_hi, acc_lo, acc_hi, HAS_HI: tl.constexpr, IEEE: tl.constexpr):
        if not IEEE:  # P rounded to the activation dtype for the second product, as flash attention does
            p = p.to(v_lo.dtype)
        acc_lo = _mm(p, v_lo, acc_lo, IEEE)
        if HAS_HI:
            acc_hi = _mm(p, v_hi, acc_hi, IEEE)
        return acc_lo, acc_hi

    @triton.jit
    def _step(q_lo, q_hi, dk_lo, dk_hi, dv_lo, dv_hi, row_a, row_b, keep_a, keep_b, m, l, acc_lo, acc_hi, c,
              MASK: tl.constexpr, TWO: tl.constexpr, HAS_HI: tl.constexpr, IEEE: tl.constexpr,
              D_LO: tl.constexpr):
        # one key tile of the online softmax: sub-tile a (rows row_a..), and b (row_b..) when TWO; m in scaled
        # log2 units, c = log2(e) / sqrt(D). Every row has seen a key by its first tile: m stays finite.
        k_lo, k_hi = _box(dk_lo, dk_hi, row_a, HAS_HI, D_LO)
        s_a = _scores(q_lo, q_hi, k_lo, k_hi, keep_a, MASK, HAS_HI, IEEE)
        m_new = tl.maximum(m, tl.max(s_a, axis=1) * c)
        if TWO:
            k_lo, k_hi = _box(dk_lo, dk_hi, row_b, HAS_HI, D_LO)
            s_b = _scores(q_lo, q_hi, k_lo, k_hi, keep_b, MASK, HAS_HI, IEEE)
            m_new = tl.maximum(m_new, tl.max(s_b, axis=1) * c)
        alpha = tl.math.exp2(m - m_new)
        acc_lo = acc_lo * alpha[:, None]
        if HAS_HI:
            acc_hi = acc_hi * alpha[:, None]
        p = tl.math.exp2(tl.fma(s_a, c, -m_new[:, None]))
        l = l * alpha + tl.sum(p, axis=1)
        v_lo, v_hi = _box(dv_lo, dv_hi, row_a, HAS_HI, D_LO)
        acc_lo, acc_hi = _pv(p, v_lo, v_hi, acc_lo, acc_hi, HAS_HI, IEEE)
        if TWO:
            p = tl.math.exp2(tl.fma(s_b, c, -m_new[:, None]))
            l += tl.sum(p, axis=1)
            v_lo, v_hi = _box(dv_lo, dv_hi, row_b, HAS_HI, D_LO)
            acc_lo, acc_hi = _pv(p, v_lo, v_hi, acc_lo, acc_hi, HAS_HI, IEEE)
        return m_new, l, acc_lo, acc_hi

    @triton.jit
    def _descs(base, rows, row_stride, D: tl.constexpr, R: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
               HAS_HI: tl.constexpr):
        # (rows, D) at row_stride as boxes of (R, D_LO) at column 0 and (R, D_HI) at column D_LO; a box past
        # column D (pad: D_LO = 128 > 96) reads zeros
        d_lo = tl.make_tensor_descriptor(base, shape=[rows, D], strides=[row_stride, 1], block_shape=[R, D_LO])
        d_hi = d_lo
        if HAS_HI:
            d_hi = tl.make_tensor_descriptor(base, shape=[rows, D], strides=[row_stride, 1], block_shape=[R, D_HI])
        return d_lo, d_hi

    @triton.jit
    def _past(q_lo, q_hi, kc, vc, bt_ptr, sbt, start, n_rows, kvh, m, l, acc_lo, acc_hi, c,
              HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
              HAS_HI: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
              STAGES: tl.constexpr):
        # positions 0..start-1 from the cache: row of position t = (block(t) * HKV + kvh) * BS + t % BS
        TWO: tl.constexpr = BLOCK_N > R
        dk_lo, dk_hi = _descs(kc, n_rows, D, D, R, D_LO, D_HI, HAS_HI)
        dv_lo, dv_hi = _descs(vc, n_rows, D, D, R, D_LO, D_HI, HAS_HI)
        full = (start // BLOCK_N) * BLOCK_N
        for n0 in tl.range(0, full, BLOCK_N, num_stages=STAGES):
            ra = (tl.load(bt_ptr + (n0 // BS) * sbt).to(tl.int32) * HKV + kvh) * BS + n0 % BS
            rb = ra
            if TWO:
                rb = (tl.load(bt_ptr + (n0 // BS + 1) * sbt).to(tl.int32) * HKV + kvh) * BS
            m, l, acc_lo, acc_hi = _step(q_lo, q_hi, dk_lo, dk_hi, dv_lo, dv_hi, ra, rb, True, True, m, l,
                                         acc_lo, acc_hi, c, False, TWO, HAS_HI, IEEE, D_LO)
        if full < start:  # the partial last tile: whole boxes, keys from start on masked (block 0 past the table)
            ia = full // BS
            ra = (tl.load(bt_ptr + ia * sbt).to(tl.int32) * HKV + kvh) * BS + full % BS
            rb = (tl.load(bt_ptr + (ia + 1) * sbt, mask=(ia + 1) * BS < start, other=0).to(tl.int32) * HKV + kvh) * BS
            keep_a = (full + tl.arange(0, R) < start)[None, :]
            keep_b = (full + R + tl.arange(0, R) < start)[None, :]
            m, l, acc_lo, acc_hi = _step(q_lo, q_hi, dk_lo, dk_hi, dv_lo, dv_hi, ra, rb, keep_a, keep_b, m, l,
                                         acc_lo, acc_hi, c, True, TWO, HAS_HI, IEEE, D_LO)
        return m, l, acc_lo, acc_hi

    @triton.jit
    def _chunk(q_lo, q_hi, kn_ptr, vn_ptr, T, kvh, sk_t, sk_h, sv_t, sv_h, m0, offs_m, m, l, acc_lo, acc_hi, c,
               D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, HAS_HI: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
               STAGES: tl.constexpr):
        # the chunk's keys 0..T-1 from the layer's K/V: whole tiles below the query tile unmasked, then the
        # tiles that reach the diagonal, causal
        TWO: tl.constexpr = BLOCK_N > R
        dk_lo, dk_hi = _descs(kn_ptr + kvh * sk_h, T, sk_t, D, R, D_LO, D_HI, HAS_HI)
        dv_lo, dv_hi = _descs(vn_ptr + kvh * sv_h, T, sv_t, D, R, D_LO, D_HI, HAS_HI)
        diag = (m0 // BLOCK_N) * BLOCK_N  # m0 itself unless BLOCK_N > BLOCK_M
        for n0 in tl.range(0, diag, BLOCK_N, num_stages=STAGES):
            m, l, acc_lo, acc_hi = _step(q_lo, q_hi, dk_lo, dk_hi, dv_lo, dv_hi, n0, n0 + R, True, True, m, l,
                                         acc_lo, acc_hi, c, False, TWO, HAS_HI, IEEE, D_LO)
        # key j seen by query i when j <= i (j < T follows; rows past T read zeros)
        for n0 in range(diag, tl.minimum(m0 + BLOCK_M, T), BLOCK_N):
            ja = n0 + tl.arange(0, R)
            m, l, acc_lo, acc_hi = _step(q_lo, q_hi, dk_lo, dk_hi, dv_lo, dv_hi, n0, n0 + R,
                                         ja[None, :] <= offs_m[:, None], (ja + R)[None, :] <= offs_m[:, None],
                                         m, l, acc_lo, acc_hi, c, True, TWO, HAS_HI, IEEE, D_LO)
        return m, l, acc_lo, acc_hi

    @triton.jit(do_not_specialize=["start", "T"])
    def _prefill_tma_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, start, T, n_rows,
                            sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sbt, so_t, so_h, c,
                            GROUP: tl.constexpr, HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                            D_LO: tl.constexpr, D_HI: tl.constexpr, HAS_HI: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        mt = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest query tile first
        h = tl.program_id(1)
        kvh = h // GROUP
        m0 = mt * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        qm = offs_m < T
        d_lo = tl.arange(0, D_LO)
        d_hi = D_LO + tl.arange(0, D_HI)
        DT = q_ptr.dtype.element_ty
        q_rows = offs_m.to(tl.int64) * sq_t + h * sq_h
        q_lo, q_hi = _load_rows(q_ptr, q_rows, d_lo, d_hi, qm, False, DT, True, HAS_HI, D)
        if D_LO > D:  # pad: zeros past D, not the next head's values (the boxes of K/V read zeros there too)
            q_lo = tl.load(q_ptr + q_rows[:, None] + d_lo[None, :], mask=qm[:, None] & (d_lo < D)[None, :], other=0.0)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc_lo = tl.zeros((BLOCK_M, D_LO), tl.float32)
        acc_hi = tl.zeros((BLOCK_M, D_HI), tl.float32)
        R: tl.constexpr = BLOCK_N if BLOCK_N <= BS else BS  # rows per TMA box: within one cache block
        m, l, acc_lo, acc_hi = _past(q_lo, q_hi, kc_ptr, vc_ptr, bt_ptr, sbt, start, n_rows, kvh, m, l, acc_lo,
                                     acc_hi, c, HKV, BS, D, D_LO, D_HI, HAS_HI, BLOCK_N, R, IEEE, STAGES)
        m, l, acc_lo, acc_hi = _chunk(q_lo, q_hi, kn_ptr, vn_ptr, T, kvh, sk_t, sk_h, sv_t, sv_h, m0, offs_m, m, l,
                                      acc_lo, acc_hi, c, D, D_LO, D_HI, HAS_HI, BLOCK_M, BLOCK_N, R, IEEE, STAGES)
        o_rows = offs_m.to(tl.int64) * so_t + h * so_h
        tl.store(out_ptr + o_rows[:, None] + d_lo[None, :], (acc_lo / l[:, None]).to(DT),
                 mask=qm[:, None] & (d_lo[None, :] < D))
        if HAS_HI:
            tl.store(out_ptr + o_rows[:, None] + d_hi[None, :], (acc_hi / l[:, None]).to(DT),
                     mask=qm[:, None] & (d_hi[None, :] < D))


def head_dim_parts(d: int, pad: bool) -> tuple[int, int]:
    """(D_LO, D_HI) of the TMA boxes: pad -> one power of 2 >= d (D_HI 0); else d when a power of 2, or the
    largest power of 2 below d and the rest rounded up (96 -> 64 + 32)."""
    if pad or d & (d - 1) == 0:
        return triton.next_power_of_2(d), 0
    lo = 1 << (d.bit_length() - 1)
    return lo, triton.next_power_of_2(d - lo)


def applies(k_cache: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether TMA can read these tensors: base addresses of every kv head's rows and their row strides in multiples
    of 16 bytes (a descriptor's requirement; the engine's bf16 tensors at head_dim 96 always are)."""
    if k.is_cuda and torch.cuda.get_device_capability(k.device)[0] < 9:  # tensor descriptors: Hopper on
        return False
    return all(t.data_ptr() % 16 == 0 and all(x * t.element_size() % 16 == 0 for x in (t.stride(0), t.stride(1)))
               for t in (k, v)) and k_cache.data_ptr() % 16 == 0 and k_cache.shape[3] * k_cache.element_size() % 16 == 0


def _scratch(size: int, alignment: int, stream) -> Tensor:
    # global memory where each program writes its tensor descriptors (tl.make_tensor_descriptor needs it)
    return torch.empty(size, device="cuda", dtype=torch.int8)


def launch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, k: Tensor, v: Tensor,
           out: Tensor, cfg) -> None:
    """Run the TMA kernel into out (T, Hq, D); the caller (paged_prefill_attention) checked the shapes and
    that this variant applies (a 16-bit or fp32 cache of q's dtype, k/v given, start a Python int)."""
    t_len, hq, d = q.shape
    n_blocks, hkv, bs = k_cache.shape[:3]
    d_lo, d_hi = head_dim_parts(d, cfg.pad)
    if cfg.block_n > bs and cfg.block_n != 2 * bs or bs % min(cfg.block_n, bs):
        raise ValueError(f"{cfg}: a TMA key tile is at most two cache blocks of {bs} tokens")
    if q.is_cuda:
        triton.set_allocator(_scratch)
    grid = (triton.cdiv(t_len, cfg.block_m), hq)
    _prefill_tma_kernel[grid](
        q, k, v, k_cache, v_cache, block_table, out, start, t_len, n_blocks * hkv * bs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), d ** -0.5 * 1.4426950408889634,
        GROUP=hq // hkv, HKV=hkv, BS=bs, D=d, D_LO=d_lo, D_HI=max(d_hi, 1), HAS_HI=d_hi > 0, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, IEEE=q.dtype == torch.float32, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_args(cfg, q))
