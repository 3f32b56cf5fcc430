"""Decode GEMVs (1..8 rows) of quantized weights on tensor cores: "swap AB" (issue 20).

The CUDA-core GEMVs (`gemv` with an fp8 scale, `int4`) load each weight tile into registers, upcast every
weight and multiply-add it once per row: instructions per weight byte, and registers that cap how many bytes
each SM has in flight (benchmarks/gemv_compile.py reads both from the SASS). Here the weight tile is the M side
of the product instead: out^T (BLOCK_N, 16) = W (BLOCK_N, BLOCK_K) @ x^T (BLOCK_K, 16), with x's 1..8 rows
padded to the 16 columns tl.dot needs. With BLOCK_N >= 64 the dot is Hopper's wgmma (M = 64 per warpgroup),
which reads the W tile from shared memory where asynchronous copies put it, num_stages tiles deep: no
per-weight instruction at all on the fp8 W8A8 path. Grid (cdiv(N, BLOCK_N), splits); split-K as in `gemv`,
reusing its deterministic sum.

fp8 weights (`GemvConfig.swap_ab`):
- "a8" (W8A8): x is quantized to e4m3 inside the kernel with one dynamic scale per row, s_x = amax|x_row| / 448
  (at least 1e-12), the per-token scale of the FP8 prefill GEMM (`fp8_act`): 448 is e4m3's largest finite value,
  so the row's largest element maps onto it and no element clips, and a per-row scale adapts to each token's
  magnitude (activations vary by orders of magnitude between tokens; weights' scales are static). Every
  program reads x's rows whole for the amax (from L2: KiBs against a weight share of 100s of KiB), so all
  splits of a row share one scale and the result does not depend on the config. The element is x * (448 /
  amax) rounded to nearest even, which can differ from the prefill quantizer's correctly rounded division in
  the last bit of a rare element. out = (Wq @ xq^T) * s_w[n] * s_x[m] in fp32. Numerics are the FP8 prefill
  GEMM's (`phi3v.models.quant.fp8_linear_reference(per_token=True)`): activation rounding (3 mantissa bits)
  on top of the weights', about as much error again.
- "a16": W upcast to x's dtype in registers (the A operand of a 16-bit wgmma may sit in registers), x as is:
  the weight-only numerics of the CUDA-core GEMV with one conversion per weight and no FMA.
The int4 weights' swap-AB kernel is `int4`'s (`Int4GemvConfig.dot`), beside its dequantisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_trigger, pdl_wait
    from phi3v.kernels.fp8_act import _FP8_MAX

M_COLS = 16  # x's rows padded to tl.dot's smallest N
AMAX_ELEMS = 4096  # elements of x per step of the amax pass (M_PAD rows x AMAX_BLOCK)
if HAVE_TRITON:
    _M_COLS = tl.constexpr(M_COLS)

if HAVE_TRITON:

    @triton.jit
    def _row_amax_scale(x_ptr, M, K, cols, M_PAD: tl.constexpr, AMAX_BLOCK: tl.constexpr):
        # (M_COLS,) per-row scale over the whole row, amax / 448 (>= 1e-12); columns >= M get 1e-12 (their x is 0).
        # Reads the M_PAD (a power of 2 >= M) rows only, then spreads their amax onto the dot's 16 columns.
        ms = tl.arange(0, M_PAD)
        amax = tl.zeros((M_PAD, AMAX_BLOCK), dtype=tl.float32)
        for k0 in range(0, K, AMAX_BLOCK):
            ks = k0 + tl.arange(0, AMAX_BLOCK)
            x = tl.load(x_ptr + ms[:, None] * K + ks[None, :], mask=(ms < M)[:, None] & (ks < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        row = tl.max(amax, axis=1)  # (M_PAD,)
        spread = tl.max(tl.where(ms[:, None] == cols[None, :], row[:, None], 0.0), axis=0)  # (M_COLS,)
        return tl.maximum(spread / _FP8_MAX, 1e-12)

    @triton.jit
    def _fp8_dot_step(x_ptr, w, acc, cols, c_ok, inv, k0, K, BLOCK_K: tl.constexpr, A8: tl.constexpr,
                      IEEE: tl.constexpr):
        # w (BLOCK_N, BLOCK_K) e4m3; x tile (M_COLS, BLOCK_K) as stored (contiguous along K), transposed for the dot
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols[:, None] * K + ks[None, :], mask=c_ok[:, None] & (ks < K)[None, :], other=0.0)
        if A8:  # |x| * 448 / amax <= 448: no clamp needed
            xq = (x.to(tl.float32) * inv[:, None]).to(tl.float8e4nv)
            # promoted to a full fp32 add once per tile: Hopper's fp8 wgmma accumulates in fewer bits, which over
            # a whole K (8,192 for down_proj) would drift from the prefill GEMM's fp32 accumulation
            return tl.dot(w, tl.trans(xq), acc, max_num_imprecise_acc=BLOCK_K)
        elif IEEE:  # fp32 x (tests): no TF32 rounding
            return tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision="ieee")
        else:
            return tl.dot(w.to(x.dtype), tl.trans(x), acc)

    @triton.jit
    def swap_ab_tile(M, N, K, k_per_split, BLOCK_N: tl.constexpr, COLS: tl.constexpr):
        # a swap-AB program of grid (cdiv(N, BLOCK_N), splits): its output features (BLOCK_N,) and x's rows as
        # the dot's COLS columns, which of each exist, and its K range [k_lo, k_hi) (the last split may be shorter)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, COLS)
        k_lo = tl.program_id(1) * k_per_split
        return rows, cols, rows < N, cols < M, k_lo, tl.minimum(k_lo + k_per_split, K)

    @triton.jit
    def store_t(out_ptr, acc, rows, cols, n_ok, c_ok, M, N):
        # acc (BLOCK_N, COLS) = out^T -> this split's (M, N) slice of out (splits, M, N), in out's dtype
        dst = out_ptr + tl.program_id(1) * M * N + cols[None, :] * N + rows[:, None]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=c_ok[None, :] & n_ok[:, None])

    @triton.jit
    def _fp8_dot_kernel(x_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, k_per_split, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, A8: tl.constexpr, IEEE: tl.constexpr, M_PAD: tl.constexpr,
                        AMAX_BLOCK: tl.constexpr, PDL: tl.constexpr):
        # x (M, K), w (N, K) e4m3, ws (N,) fp32, out (splits, M, N) fp32 partials or y (M, N) in x's dtype.
        # k_per_split is a multiple of BLOCK_K. The first W tile is read before waiting for x (no kernel writes
        # weights); the accumulator is out^T.
        rows, cols, n_ok, c_ok, k_lo, k_hi = swap_ab_tile(M, N, K, k_per_split, BLOCK_N, _M_COLS)
        w_row = rows.to(tl.int64) * K  # N*K overflows int32 in larger models
        pdl_trigger(PDL)
        ks = k_lo + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + w_row[:, None] + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        pdl_wait(PDL)
        if A8:
            xs = _row_amax_scale(x_ptr, M, K, cols, M_PAD, AMAX_BLOCK)
            inv = 1.0 / xs  # 448 / amax: x is scaled by a product
        else:
            xs = tl.full((_M_COLS,), 1.0, tl.float32)
            inv = xs
        acc = tl.zeros((BLOCK_N, _M_COLS), dtype=tl.float32)
        acc = _fp8_dot_step(x_ptr, w, acc, cols, c_ok, inv, k_lo, K, BLOCK_K, A8, IEEE)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + w_row[:, None] + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc = _fp8_dot_step(x_ptr, w, acc, cols, c_ok, inv, k0, K, BLOCK_K, A8, IEEE)
        store_t(out_ptr, acc * tl.load(ws_ptr + rows, mask=n_ok, other=0.0)[:, None] * xs[None, :], rows, cols, n_ok,
                c_ok, M, N)


SWAP_AB = ("a8", "a16")


def launch_fp8(x2: Tensor, weight: Tensor, scale: Tensor, dst: Tensor, k_per_split: int, splits: int, block_n: int,
               block_k: int, swap_ab: str, num_warps: int, num_stages: int, pdl: bool) -> None:
    """x2 (M, K) contiguous, weight (N, K) e4m3, scale (N,) fp32 -> dst: (M, N) in x's dtype with one split,
    else the (splits, M, N) fp32 partials that `gemv` sums."""
    m, k = x2.shape
    n = weight.shape[0]
    m_pad = triton.next_power_of_2(m)
    _fp8_dot_kernel[(-(-n // block_n), splits)](
        x2, weight, scale, dst, m, n, k, k_per_split, BLOCK_N=block_n, BLOCK_K=block_k, A8=swap_ab == "a8",
        IEEE=x2.dtype == torch.float32, M_PAD=m_pad, AMAX_BLOCK=min(AMAX_ELEMS // m_pad, triton.next_power_of_2(k)),
        num_warps=num_warps,
        num_stages=num_stages, **pdl_args(x2, pdl))
