"""An sm90 paged prefill attention written in Gluon (Triton's explicit-layout dialect): FlashAttention-3's
intra-warpgroup overlap, which plain Triton does not schedule (docs/perf-log.md, 2026-12-05).

Experimental, selected by PrefillConfig variant "gluon"; not the default. Gluon kernels do not run in Triton's CPU
interpreter: tests/gpu/test_prefill_tma_check.py checks it against the pointer kernel on the GPU before any timing.

One program = BLOCK_M queries of one head, one warpgroup (4 warps), two programs per SM. Every key, the chunk's own
included, is read from the cache through the sequence's block table (PrefillAttention stores the chunk's K/V before
attending and passes a table covering positions 0..start+T-1; the cache holds finite values, as a zero-initialised
cache written only with K/V does, so the masked slots of a last, partial block add 0 x finite). A key tile is one
cache block (BLOCK_N = BS): TMA copies its K and V (head_dim as 64 + 32 columns) into a ring of STAGES
shared-memory slots, each with an mbarrier for K and one for V. Step j, in FlashAttention-3's order:

    S(j) = Q K(j)^T issued               (async)
    O *= alpha(j-1); O += P(j-1) V(j-1) issued (async, P from shared memory)
    wait S(j); softmax of S(j) -> P(j)   (CUDA cores, while the tensor cores do P(j-1) V(j-1))
    P(j) into the other P slot; wait P(j-1) V(j-1); TMA of tile j-1+STAGES into the ring slot tile j-1 freed

What the compile showed (benchmarks/prefill_compile.py, docs/perf-log.md 2026-12-05) and this layout avoids: a
branch while a product is in flight (the causal tiles run in their own loop; the TMA issue is predicated), scores
carried in flight from one step to the next, and P as a register operand (ptxas reuses the registers an operand in
flight is read from and then waits for the product before the softmax) each made ptxas wait for, or serialize,
the wgmma. The softmax works in log2 units with the scale folded into one FMA.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton >= 3.5 (Gluon); the import fails on older Tritons and on installs without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    # the TMA load's name: async_copy_global_to_shared up to Triton 3.6 (the GPU machine's), async_load later
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - depends on the install (a Triton without these names)
    HAVE_GLUON = False

if HAVE_GLUON:
    @gluon.jit
    def _issue(j, n, bt_ptr, sbt, kvh, dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar,
               HKV: gl.constexpr, BS: gl.constexpr, D_LO: gl.constexpr, STAGES: gl.constexpr):
        # TMA loads of key tile j (cache block bt[j] of kv head kvh) into ring slot j % STAGES, when j < n:
        # predicated, not branched around (a branch while a wgmma is in flight makes ptxas serialize them)
        s = j % STAGES
        go = j < n
        row = (gl.load(bt_ptr + j * sbt, mask=go, other=0).to(gl.int32) * HKV + kvh) * BS
        kb = kbar.index(s)
        mbarrier.expect(kb, dk_lo.block_type.nbytes + dk_hi.block_type.nbytes, pred=go)
        _tma_load(dk_lo, [row, 0], kb, k_lo.index(s), pred=go)
        _tma_load(dk_hi, [row, D_LO], kb, k_hi.index(s), pred=go)
        vb = vbar.index(s)
        mbarrier.expect(vb, dv_lo.block_type.nbytes + dv_hi.block_type.nbytes, pred=go)
        _tma_load(dv_lo, [row, 0], vb, v_lo.index(s), pred=go)
        _tma_load(dv_hi, [row, D_LO], vb, v_hi.index(s), pred=go)

    @gluon.jit
    def _qk(j, q_lo, q_hi, k_lo, k_hi, kbar, s0, STAGES: gl.constexpr):
        # S = Q K(j)^T issued as two async wgmma groups (64 + 32 columns of head_dim), once K(j) has landed
        s = j % STAGES
        mbarrier.wait(kbar.index(s), (j // STAGES) & 1)
        acc = warpgroup_mma(q_lo, k_lo.index(s).permute((1, 0)), s0, use_acc=False, is_async=True)
        return warpgroup_mma(q_hi, k_hi.index(s).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _mask(s, j, q_pos, MASK: gl.constexpr, BLOCK_N: gl.constexpr, S_L: gl.constexpr):
        # the causal mask of tile j when MASK (a tile that reaches a query of this program); no branch on j: a
        # branch while a product is in flight makes ptxas wait for it there
        if MASK:
            k_pos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
            s = gl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
        return s

    @gluon.jit
    def _softmax(s, m, l, c):
        # online softmax in log2 units: p, the rescale alpha, new m and l
        m_new = gl.maximum(m, gl.max(s, axis=1) * c)
        p = gl.exp2(s * c - m_new[:, None])
        alpha = gl.exp2(m - m_new)
        l = l * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l

    @gluon.jit
    def _pv(j, p_smem, o_lo, o_hi, v_lo, v_hi, vbar, STAGES: gl.constexpr):
        # O += P(j) V(j) issued as two async wgmma groups once V(j) has landed; P(j) (bf16) from shared memory,
        # slot j % 2. Not from registers: ptxas reuses the registers an operand in flight is read from for the
        # next softmax and then waits for the product before it, which undoes the overlap. Two slots: P(j+1) is
        # written while this product reads P(j) (with one, ptxas moves the wait for it before the softmax).
        s = j % STAGES
        mbarrier.wait(vbar.index(s), (j // STAGES) & 1)
        p = p_smem.index(j % 2)
        o_lo = warpgroup_mma(p, v_lo.index(s), o_lo, is_async=True)
        o_hi = warpgroup_mma(p, v_hi.index(s), o_hi, is_async=True)
        return o_lo, o_hi

    @gluon.jit
    def _put_p(j, p, p_smem):
        # P(j) into its slot for the second product
        p_smem.index(j % 2).store(p.to(gl.bfloat16))
        fence_async_shared()  # written by the threads, read by wgmma (the async proxy)

    @gluon.jit
    def _rescale(o_lo, o_hi, alpha, O_LO: gl.constexpr, O_HI: gl.constexpr):
        o_lo = o_lo * gl.convert_layout(alpha, gl.SliceLayout(1, O_LO))[:, None]
        o_hi = o_hi * gl.convert_layout(alpha, gl.SliceLayout(1, O_HI))[:, None]
        return o_lo, o_hi

    @gluon.jit
    def _step(j, alpha, o_lo, o_hi, m, l, n, q_pos, c, q_lo, q_hi, p_smem, bt_ptr, sbt, kvh, dk_lo, dk_hi, dv_lo,
              dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar, s0, MASK: gl.constexpr, HKV: gl.constexpr,
              BS: gl.constexpr, D_LO: gl.constexpr, STAGES: gl.constexpr, S_L: gl.constexpr, O_LO: gl.constexpr,
              O_HI: gl.constexpr):
        # key tile j, as FlashAttention-3 orders it: S(j) = Q K(j)^T issued, O rescaled, O += P(j-1) V(j-1)
        # issued; once S(j) is in, its softmax runs while the tensor cores do P(j-1) V(j-1). Leaves P(j) in its
        # slot and returns its rescale; O holds no product in flight between steps.
        s = _qk(j, q_lo, q_hi, k_lo, k_hi, kbar, s0, STAGES)
        o_lo, o_hi = _rescale(o_lo, o_hi, alpha, O_LO, O_HI)
        o_lo, o_hi = _pv(j - 1, p_smem, o_lo, o_hi, v_lo, v_hi, vbar, STAGES)
        s = warpgroup_mma_wait(2, deps=[s])  # S(j) in (issued first), P(j-1) V(j-1) still running
        p, alpha, m, l = _softmax(_mask(s, j, q_pos, MASK, BS, S_L), m, l, c)
        _put_p(j, p, p_smem)  # the other slot than P(j-1)'s, which the product in flight reads
        o_lo, o_hi = warpgroup_mma_wait(0, deps=[o_lo, o_hi])
        # tile j-1's slot is free (its products are done): tile j-1+STAGES goes there
        _issue(j - 1 + STAGES, n, bt_ptr, sbt, kvh, dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar,
               HKV, BS, D_LO, STAGES)
        return alpha, o_lo, o_hi, m, l

    @gluon.jit
    def _load_q(q_ptr, h, m0, T, sq_t, sq_h, BLOCK_M: gl.constexpr, D_LO: gl.constexpr, D_HI: gl.constexpr,
                num_warps: gl.constexpr):
        # the program's queries into shared memory (wgmma's A operand): 64 + 32 columns, rows past T zero
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
        base = q_ptr + rows.to(gl.int64)[:, None] * sq_t + h * sq_h
        lo = gl.load(base + gl.arange(0, D_LO, layout=gl.SliceLayout(0, ld))[None, :], mask=(rows < T)[:, None],
                     other=0.0)
        hi = gl.load(base + D_LO + gl.arange(0, D_HI, layout=gl.SliceLayout(0, ld))[None, :],
                     mask=(rows < T)[:, None], other=0.0)
        q_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D_LO], gl.NVMMASharedLayout(128, 16), lo)
        q_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D_HI], gl.NVMMASharedLayout(D_HI * 2, 16), hi)
        fence_async_shared()  # stored by the threads, read by wgmma (the async proxy)
        return q_lo, q_hi

    @gluon.jit
    def _store_o(out_ptr, h, m0, T, so_t, so_h, o_lo, o_hi, l, BLOCK_M: gl.constexpr, D_LO: gl.constexpr,
                 D_HI: gl.constexpr, O_LO: gl.constexpr, O_HI: gl.constexpr):
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, O_LO))
        base = out_ptr + rows.to(gl.int64)[:, None] * so_t + h * so_h
        o_lo = o_lo / gl.convert_layout(l, gl.SliceLayout(1, O_LO))[:, None]
        gl.store(base + gl.arange(0, D_LO, layout=gl.SliceLayout(0, O_LO))[None, :], o_lo.to(gl.bfloat16),
                 mask=(rows < T)[:, None])
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, O_HI))
        base = out_ptr + rows.to(gl.int64)[:, None] * so_t + h * so_h
        o_hi = o_hi / gl.convert_layout(l, gl.SliceLayout(1, O_HI))[:, None]
        gl.store(base + D_LO + gl.arange(0, D_HI, layout=gl.SliceLayout(0, O_HI))[None, :], o_hi.to(gl.bfloat16),
                 mask=(rows < T)[:, None])

    @gluon.jit
    def _ring(n_rows, kc_ptr, vc_ptr, BLOCK_N: gl.constexpr, D: gl.constexpr, D_LO: gl.constexpr,
              D_HI: gl.constexpr, STAGES: gl.constexpr):
        # descriptors over one layer's cache viewed (n_blocks * Hkv * BS, D), and the shared-memory ring they fill
        sl_lo: gl.constexpr = gl.NVMMASharedLayout(128, 16)
        sl_hi: gl.constexpr = gl.NVMMASharedLayout(D_HI * 2, 16)
        dk_lo = tma.make_tensor_descriptor(kc_ptr, [n_rows, D], [D, 1], [BLOCK_N, D_LO], sl_lo)
        dk_hi = tma.make_tensor_descriptor(kc_ptr, [n_rows, D], [D, 1], [BLOCK_N, D_HI], sl_hi)
        dv_lo = tma.make_tensor_descriptor(vc_ptr, [n_rows, D], [D, 1], [BLOCK_N, D_LO], sl_lo)
        dv_hi = tma.make_tensor_descriptor(vc_ptr, [n_rows, D], [D, 1], [BLOCK_N, D_HI], sl_hi)
        k_lo = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_LO], sl_lo)
        k_hi = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_HI], sl_hi)
        v_lo = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_LO], sl_lo)
        v_hi = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_HI], sl_hi)
        kbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(kbar.index(i), count=1)
            mbarrier.init(vbar.index(i), count=1)
        return dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar

    @gluon.jit(do_not_specialize=["start", "T"])
    def _prefill_gluon_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, out_ptr, start, T, n_rows, sq_t, sq_h, sbt, so_t, so_h,
                              c, GROUP: gl.constexpr, HKV: gl.constexpr, BS: gl.constexpr, D: gl.constexpr,
                              D_LO: gl.constexpr, D_HI: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                              num_warps: gl.constexpr):
        BLOCK_N: gl.constexpr = BS
        S_L: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [num_warps, 1], [16, BLOCK_N, 16])
        O_LO: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [num_warps, 1], [16, D_LO, 16])
        O_HI: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [num_warps, 1], [16, D_HI, 16])
        m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M  # heaviest query tile first
        h = gl.program_id(1)
        kvh = h // GROUP
        q_lo, q_hi = _load_q(q_ptr, h, m0, T, sq_t, sq_h, BLOCK_M, D_LO, D_HI, num_warps)
        dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar = _ring(n_rows, kc_ptr, vc_ptr, BLOCK_N, D,
                                                                               D_LO, D_HI, STAGES)
        n = gl.cdiv(gl.minimum(start + m0 + BLOCK_M, start + T), BLOCK_N)  # key tiles any query here sees
        n_free = (start + m0 + 1) // BLOCK_N  # tiles every query here sees whole
        q_pos = start + m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, S_L))
        for i in gl.static_range(STAGES):  # every slot; step j refills tile j-1's with tile j-1+STAGES
            _issue(i, n, bt_ptr, sbt, kvh, dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar, HKV, BS,
                   D_LO, STAGES)
        m = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
        l = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, S_L))
        o_lo = gl.zeros([BLOCK_M, D_LO], gl.float32, O_LO)
        o_hi = gl.zeros([BLOCK_M, D_HI], gl.float32, O_HI)
        s0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_L)
        s = warpgroup_mma_wait(0, deps=[_qk(0, q_lo, q_hi, k_lo, k_hi, kbar, s0, STAGES)])
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, BLOCK_N], gl.NVMMASharedLayout(BLOCK_N * 2, 16))
        # tile 0 masked (a no-op unless it reaches a query here): the loops below start at tile 1
        p, alpha, m, l = _softmax(_mask(s, 0, q_pos, True, BLOCK_N, S_L), m, l, c)
        _put_p(0, p, p_smem)
        j_mask = gl.maximum(n_free, 1)  # tiles 1..j_mask-1 every query here sees whole; from j_mask on, causal
        for j in range(1, j_mask):
            alpha, o_lo, o_hi, m, l = _step(j, alpha, o_lo, o_hi, m, l, n, q_pos, c, q_lo, q_hi, p_smem, bt_ptr, sbt,
                                            kvh, dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar, s0,
                                            False, HKV, BS, D_LO, STAGES, S_L, O_LO, O_HI)
        for j in range(j_mask, n):
            alpha, o_lo, o_hi, m, l = _step(j, alpha, o_lo, o_hi, m, l, n, q_pos, c, q_lo, q_hi, p_smem, bt_ptr, sbt,
                                            kvh, dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, kbar, vbar, s0,
                                            True, HKV, BS, D_LO, STAGES, S_L, O_LO, O_HI)
        o_lo, o_hi = _rescale(o_lo, o_hi, alpha, O_LO, O_HI)
        o_lo, o_hi = warpgroup_mma_wait(0, deps=_pv(n - 1, p_smem, o_lo, o_hi, v_lo, v_hi, vbar, STAGES))
        _store_o(out_ptr, h, m0, T, so_t, so_h, o_lo, o_hi, l, BLOCK_M, D_LO, D_HI, O_LO, O_HI)


def applies(q: Tensor, k_cache: Tensor, cfg) -> bool:
    """The shapes this kernel is written for: bf16, head_dim 96 (64 + 32), key tiles of one cache block."""
    return (HAVE_GLUON and q.is_cuda and q.dtype == k_cache.dtype == torch.bfloat16 and q.shape[2] == 96
            and cfg.block_n == k_cache.shape[2] and cfg.num_warps == 4 and k_cache.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(q.device)[0] == 9)  # wgmma and its TMA: Hopper only


def launch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, out: Tensor, cfg) -> None:
    """Run the kernel into out (T, Hq, D); block_table covers positions 0..start+T-1, whose K/V are all in the
    cache. The caller checked `applies`."""
    import triton

    from phi3v.kernels.prefill_hopper import _scratch

    t_len, hq, d = q.shape
    n_blocks, hkv, bs = k_cache.shape[:3]
    triton.set_allocator(_scratch)
    grid = (triton.cdiv(t_len, cfg.block_m), hq)
    _prefill_gluon_kernel[grid](
        q, k_cache, v_cache, block_table, out, start, t_len, n_blocks * hkv * bs, q.stride(0), q.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1), d ** -0.5 * 1.4426950408889634,
        GROUP=hq // hkv, HKV=hkv, BS=bs, D=d, D_LO=64, D_HI=32, BLOCK_M=cfg.block_m, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps)
