"""y = x @ W.T with W in int4 (weight-only, groups of G along K, asymmetric), dequantised in registers.

Layout (what `phi3v.models.quant.quantize_int4` writes):
- qweight (N, K/2) uint8. K is cut into groups of G (G in 32, 64, 128, 256; K % G == 0). Within group g of
  row n, byte g*G/2 + j (0 <= j < G/2) holds element g*G + j in its low nibble and element g*G + G/2 + j in
  its high nibble: a group's low nibbles are its first half, its high nibbles its second half, so a kernel
  reads two contiguous halves of x per group and never interleaves.
- scales, mins (N, K/G) fp16: element w = code * scale + min (codes 0..15; `min` is the group's minimum).

Three kernels, none of which ever holds the dequantised matrix:
- `gemv` (1..8 rows, decode): each program streams (BLOCK_N, BLOCK_K/G, G/2) byte tiles along K, unpacks both
  nibbles, applies the group's scale and min with one FMA and multiplies-and-sums against x in fp32.
- the same on tensor cores (`Int4GemvConfig.dot`, "swap AB" as phi3v.kernels.gemv_dot): per group, the codes
  themselves, exact small integers in x's dtype, are the M side of two tl.dot, P (BLOCK_N, 16) = Q_lo (BLOCK_N,
  G/2) @ x_lo^T (G/2, 16) + Q_hi @ x_hi^T, and the group's scale and min are applied to P in fp32:
  sum_j x_j (q_j s + m) = s P + m sum_j x_j. No FMA per weight and row, no rounding of a dequantised weight
  (the numerics of x @ dequant(W).T in fp32); per weight only the code's extraction (a mask or shift, an OR and
  a subtraction, two weights an instruction in 16 bits). Split-K as `gemv`'s, its deterministic sum.
- `gemm` (prefill): tl.dot tiles; per K step (one group) it loads the (G/2, BLOCK_N) byte tile, dequantises
  the two halves to x's dtype and issues two dots against the two halves of the x tile.
Tuning: benchmarks/quant_check.py (random full-size weights on the GPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, INTERPRET, available, gemv, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_trigger, pdl_wait
    from phi3v.kernels.gemv_dot import store_t, swap_ab_tile

MAX_M = 8  # rows that go through the GEMV; more go through the GEMM
X_COLS = 16  # the dot GEMV's x rows, padded to tl.dot's smallest N
if HAVE_TRITON:
    _X_COLS = tl.constexpr(X_COLS)
GROUP_SIZES = (32, 64, 128, 256)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Int4GemvConfig:
    block_n: int = 4  # output features per program (power of 2)
    block_k: int = 0  # K elements per tile, a power of 2 >= G (0: 1024 for 1-2 rows, 512 for 3-4, 256 beyond;
    # G with `dot`); shortened to K when K is shorter
    num_warps: int = 4
    # the swap-AB tensor-core kernel instead (`_int4_dot_kernel`: the code tile as the M side of tl.dot, x^T
    # padded to 16 columns, one group per K step, block_k unused; block_n >= 16, >= 64 for wgmma), with its
    # pipelining depth and K splits; `asm`: its codes unpacked by inline PTX (`_codes_asm`; bf16 x on the GPU,
    # the plain path elsewhere: the CPU interpreter cannot run PTX)
    dot: bool = False
    num_stages: int = 1
    split_k: int = 1
    asm: bool = False

    def __post_init__(self) -> None:
        assert not self.dot or self.block_n >= 16, self
        assert self.split_k >= 1 and (self.dot or self.split_k == 1), "split_k is the dot kernel's"


@dataclass(frozen=True)
class Int4GemmConfig:
    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


if HAVE_TRITON:

    @triton.jit
    def _dequant(b, s, m, HIGH: tl.constexpr):
        # b uint8 codes of two elements, s/m their group's fp16 scale and min (broadcastable) -> fp32.
        # The code becomes a float without an int->float conversion (a quarter-rate instruction, which would
        # bound the GEMV below HBM bandwidth): 0x4B000000 | q is the fp32 2**23 + q, exact; subtracting 2**23
        # (a full-rate add) leaves q.
        q = ((b >> 4) if HIGH else (b & 15)).to(tl.int32)
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return qf * s.to(tl.float32) + m.to(tl.float32)

    @triton.jit
    def _gemv_tile(qw_ptr, s_ptr, m_ptr, qrow, srow, n_ok, k0, K, GPT: tl.constexpr, HALF: tl.constexpr,
                   G: tl.constexpr):
        # the weights of one K tile: bytes (BLOCK_N, GPT, HALF), scales and mins (BLOCK_N, GPT, 1)
        grp = k0 // G + tl.arange(0, GPT)  # groups of this tile; K % G == 0: a group is whole or absent
        g_ok = grp < K // G
        b = tl.load(qw_ptr + qrow[:, None, None] + (grp * HALF)[None, :, None] + tl.arange(0, HALF)[None, None, :],
                    mask=n_ok[:, None, None] & g_ok[None, :, None], other=0, eviction_policy="evict_first")
        g_off = srow[:, None] + grp[None, :]
        s = tl.load(s_ptr + g_off, mask=n_ok[:, None] & g_ok[None, :], other=0.0)[:, :, None]
        mn = tl.load(m_ptr + g_off, mask=n_ok[:, None] & g_ok[None, :], other=0.0)[:, :, None]
        return b, s, mn

    @triton.jit
    def _gemv_step(x_ptr, b, s, mn, acc, ms, m_ok, k0, K, GPT: tl.constexpr, HALF: tl.constexpr, G: tl.constexpr):
        grp = k0 // G + tl.arange(0, GPT)
        x_off = ms[:, None, None] * K + (grp * G)[None, :, None] + tl.arange(0, HALF)[None, None, :]
        x_mask = m_ok[:, None, None] & (grp < K // G)[None, :, None]
        x_lo = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)  # (M_PAD, GPT, HALF)
        x_hi = tl.load(x_ptr + x_off + HALF, mask=x_mask, other=0.0).to(tl.float32)
        acc += x_lo[:, None, :, :] * _dequant(b, s, mn, False)[None, :, :, :]
        return acc + x_hi[:, None, :, :] * _dequant(b, s, mn, True)[None, :, :, :]

    @triton.jit
    def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr, M, N, K, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, G: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr):
        # grid (cdiv(N, BLOCK_N),); x (M, K), qweight (N, K/2), scales/mins (N, K/G), out (M, N) in x's dtype.
        # A tile is (BLOCK_N, GPT, G/2) bytes: GPT whole groups, so a group's scale and min broadcast along
        # the last axis (no per-element gathers); products summed over the last two axes after the loop.
        # EARLY (with PDL on the GPU; alone in tests): the first tile is read before waiting for x.
        HALF: tl.constexpr = G // 2
        GPT: tl.constexpr = BLOCK_K // G
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        ms = tl.arange(0, M_PAD)
        n_ok = rows < N
        m_ok = ms < M
        qrow = rows.to(tl.int64) * (K // 2)
        srow = rows.to(tl.int64) * (K // G)
        acc = tl.zeros((M_PAD, BLOCK_N, GPT, HALF), dtype=tl.float32)
        pdl_trigger(PDL)
        start = 0
        if EARLY:  # no kernel writes weights: read them while the previous kernel drains
            b, s, mn = _gemv_tile(qw_ptr, s_ptr, m_ptr, qrow, srow, n_ok, 0, K, GPT, HALF, G)
            pdl_wait(PDL)
            acc = _gemv_step(x_ptr, b, s, mn, acc, ms, m_ok, 0, K, GPT, HALF, G)
            start = BLOCK_K
        else:
            pdl_wait(PDL)  # x is the previous kernel's output
        for k0 in range(start, K, BLOCK_K):
            b, s, mn = _gemv_tile(qw_ptr, s_ptr, m_ptr, qrow, srow, n_ok, k0, K, GPT, HALF, G)
            acc = _gemv_step(x_ptr, b, s, mn, acc, ms, m_ok, k0, K, GPT, HALF, G)
        y = tl.sum(tl.sum(acc, axis=3), axis=2)  # (M_PAD, BLOCK_N)
        tl.store(out_ptr + ms[:, None] * N + rows[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, G: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        # grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); one K step = one group: two (BLOCK_M, G/2) x (G/2, BLOCK_N) dots
        HALF: tl.constexpr = G // 2
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        j = tl.arange(0, HALF)
        x_row = rm.to(tl.int64) * K
        qcol = rn.to(tl.int64) * (K // 2)  # (BLOCK_N,) row starts of W, laid out as columns of the B tile
        scol = rn.to(tl.int64) * (K // G)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        pdl_trigger(PDL)
        pdl_wait(PDL)
        for g in range(0, K // G):
            b = tl.load(qw_ptr + qcol[None, :] + (g * HALF + j)[:, None], mask=n_ok[None, :], other=0)  # (HALF, BN)
            s = tl.load(s_ptr + scol + g, mask=n_ok, other=0.0)[None, :]
            mn = tl.load(m_ptr + scol + g, mask=n_ok, other=0.0)[None, :]
            x_off = x_row[:, None] + (g * G + j)[None, :]
            x_lo = tl.load(x_ptr + x_off, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, HALF)
            x_hi = tl.load(x_ptr + x_off + HALF, mask=m_ok[:, None], other=0.0)
            w_lo = _dequant(b, s, mn, False).to(x_lo.dtype)
            w_hi = _dequant(b, s, mn, True).to(x_lo.dtype)
            if IEEE:  # fp32 inputs (tests): no TF32 rounding
                acc = tl.dot(x_lo, w_lo, acc, input_precision="ieee")
                acc = tl.dot(x_hi, w_hi, acc, input_precision="ieee")
            else:
                acc = tl.dot(x_lo, w_lo, acc)
                acc = tl.dot(x_hi, w_hi, acc)
        dst = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _codes(b, HIGH: tl.constexpr, dtype: tl.constexpr):
        # b's low / high 4-bit codes as exact small floats of `dtype`, without an int->float conversion (quarter
        # rate): bf16 0x4300 | q is 128 + q, fp16 0x6400 | q is 1024 + q, fp32 0x4B000000 | q is 2**23 + q; one
        # subtraction (two elements per instruction in 16 bits) leaves q
        q = (b >> 4) if HIGH else (b & 15)
        if dtype == tl.bfloat16:
            return (q.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
        elif dtype == tl.float16:
            return (q.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        else:
            return (q.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _codes_asm(b):
        # (lo, hi) codes of 2 bytes at a time as bf16 128 + q (two bf16 a register; exact): the 16 bits [b0, b1]
        # spread to [b0, 0, b1, 0] by one PRMT, then one LOP3 ((w & 0x000F000F) | 0x43004300) for the low nibbles
        # and a shift and one for the high ones: 1 instruction per code, where Triton's own unpacking of the
        # bytes of a 16-bit shared-memory load costs ~2.6 with the subtraction (benchmarks/gemv_compile.py)
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 w, t, h;
            cvt.u32.u16 w, $2;
            prmt.b32 t, w, 0, 0x4140;
            shr.b32 h, t, 4;
            lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;
            lop3.b32 $1, h, 0x000F000F, 0x43004300, 0xEA;
            }""",
            "=r,=r,h", [b], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)

    @triton.jit
    def _int4_dot_step(x_ptr, qw_ptr, s_ptr, m_ptr, acc, qrow, srow, n_ok, cols, c_ok, k0, K, G: tl.constexpr,
                       IEEE: tl.constexpr, ASM: tl.constexpr):
        # the group starting at k0: codes (BLOCK_N, G/2) x2 against x^T (G/2, X_COLS) x2, then the group's scale
        # and min in fp32: sum_j x_j (q_j s + m) = s * (Q @ x) + m * sum_j x_j
        HALF: tl.constexpr = G // 2
        j = tl.arange(0, HALF)
        b = tl.load(qw_ptr + qrow[:, None] + (k0 // 2 + j)[None, :], mask=n_ok[:, None], other=0,
                    eviction_policy="evict_first")
        s = tl.load(s_ptr + srow + k0 // G, mask=n_ok, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + srow + k0 // G, mask=n_ok, other=0.0).to(tl.float32)
        x_off = cols[:, None] * K + (k0 + j)[None, :]
        x_lo = tl.load(x_ptr + x_off, mask=c_ok[:, None], other=0.0)  # (X_COLS, HALF) as stored, transposed below
        x_hi = tl.load(x_ptr + x_off + HALF, mask=c_ok[:, None], other=0.0)
        if ASM:  # bf16 x on the GPU: codes as 128 + q, the 128 * sum_j x_j taken back out in fp32 below
            q_lo, q_hi = _codes_asm(b)
            mn = mn - 128.0 * s
        else:
            q_lo = _codes(b, False, x_lo.dtype)
            q_hi = _codes(b, True, x_lo.dtype)
        if IEEE:  # fp32 x (tests): no TF32 rounding
            part = tl.dot(q_hi, tl.trans(x_hi), tl.dot(q_lo, tl.trans(x_lo), input_precision="ieee"),
                          input_precision="ieee")
        else:
            part = tl.dot(q_hi, tl.trans(x_hi), tl.dot(q_lo, tl.trans(x_lo)))
        xsum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)  # (X_COLS,)
        return acc + part * s[:, None] + mn[:, None] * xsum[None, :]

    @triton.jit
    def _int4_dot_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, out_ptr, M, N, K, k_per_split, BLOCK_N: tl.constexpr,
                         G: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr = False):
        # x (M, K), qweight (N, K/2) uint8, scales / mins (N, K/G) fp16 (`int4`'s layout); out (splits, M, N)
        # fp32 partials or y (M, N) in x's dtype. k_per_split is a multiple of G; one group per step.
        rows, cols, n_ok, c_ok, k_lo, k_hi = swap_ab_tile(M, N, K, k_per_split, BLOCK_N, _X_COLS)
        qrow = rows.to(tl.int64) * (K // 2)
        srow = rows.to(tl.int64) * (K // G)
        acc = tl.zeros((BLOCK_N, _X_COLS), dtype=tl.float32)
        pdl_trigger(PDL)
        pdl_wait(PDL)  # x is the previous kernel's output
        for k0 in range(k_lo, k_hi, G):
            acc = _int4_dot_step(x_ptr, qw_ptr, s_ptr, m_ptr, acc, qrow, srow, n_ok, cols, c_ok, k0, K, G, IEEE, ASM)
        store_t(out_ptr, acc, rows, cols, n_ok, c_ok, M, N)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_gemm_config(m: int) -> Int4GemmConfig:
    """Untuned starting points (benchmarks/quant_check.py --sweep measures the alternatives): big row tiles for
    long prompts, where the dequantised B tile is then shared by more rows; 16-row tiles for short batches."""
    if m >= 1024:
        return Int4GemmConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    if m <= 16:
        return Int4GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    return Int4GemmConfig()


@functools.cache
def default_dot_config(n: int, k: int) -> Int4GemvConfig:
    """The tensor-core GEMV's config for an (N, K) weight (QuantSpec.decode_dot). Not measured yet: a tile of
    benchmarks/gemv_compile.py's survivors (the inline-PTX unpack: fewest instructions per byte); quant_sweep.py's
    `best_by_kernel` dot entries replace it once measured."""
    block_n = 128 if n > 4096 else 64  # more row blocks for o_proj, down
    split = gemv.dot_splits(n, k, block_n, 128)
    return Int4GemvConfig(block_n, 0, 4, dot=True, num_stages=4, split_k=split, asm=True)


def group_size(qweight: Tensor, scales: Tensor) -> int:
    """G of a packed weight: K / groups per row."""
    return 2 * qweight.shape[1] // scales.shape[1]


def supported(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor) -> bool:
    """Whether linear() takes this: Triton on CUDA (or the interpreter), the layout above, x (..., K)."""
    if not HAVE_TRITON or qweight.dim() != 2 or scales.dim() != 2 or x.dim() < 1:
        return False
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if n == 0 or k == 0 or x.shape[-1] != k or x.dtype not in _DTYPES or qweight.dtype != torch.uint8:
        return False
    if scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1] or mins.shape != scales.shape:
        return False
    if group_size(qweight, scales) not in GROUP_SIZES or x.numel() == 0:
        return False
    same = all(t.device == x.device and t.is_contiguous() for t in (qweight, scales, mins))
    return same and available(x.device)


def _dot_gemv(x2: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, out: Tensor, g: int, cfg: Int4GemvConfig,
              pdl: bool) -> None:
    """The swap-AB GEMV into out (M, N): one group per K step, K split as gemv's (at group boundaries)."""
    m, k = x2.shape
    n = qweight.shape[0]
    k_per_split = _cdiv(_cdiv(k, cfg.split_k), g) * g
    splits = _cdiv(k, k_per_split)
    dst = out if splits == 1 else torch.empty(splits, m, n, device=x2.device, dtype=torch.float32)
    _int4_dot_kernel[(_cdiv(n, cfg.block_n), splits)](
        x2, qweight, scales, mins, dst, m, n, k, k_per_split, BLOCK_N=cfg.block_n, G=g,
        IEEE=x2.dtype == torch.float32, ASM=cfg.asm and x2.dtype == torch.bfloat16 and not INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x2, pdl))
    if splits > 1:
        gemv.splitk_sum(dst, out, pdl)


def linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, pdl: bool = False,
           gemv_config: Int4GemvConfig | None = None, gemm_config: Int4GemmConfig | None = None,
           early: bool = False) -> Tensor:
    """x (..., K) @ dequant(W).T -> (..., N) in x's dtype: the GEMV for up to MAX_M rows, else the GEMM.
    `early`: the GEMV's first weight tile is read before x even without PDL (tests of that path)."""
    k, n = x.shape[-1], qweight.shape[0]
    g = group_size(qweight, scales)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m <= MAX_M and gemv_config is not None and gemv_config.dot:
        _dot_gemv(x2, qweight, scales, mins, out, g, gemv_config, pdl)
    elif m <= MAX_M:
        # block_n 8 at 1-2 rows: quant_sweep.py's winner at batch 1 on the H200 (docs/perf-log.md)
        cfg = gemv_config or Int4GemvConfig(block_n=8 if m <= 2 else 4)
        want = cfg.block_k or (1024 if m <= 2 else 512 if m <= 4 else 256)  # the accumulator is M_PAD x tile
        block_k = max(g, min(want, 1 << (k - 1).bit_length()))  # a multiple of G, no longer than needed
        launch = pdl_args(x2, pdl)
        _int4_gemv_kernel[(_cdiv(n, cfg.block_n),)](
            x2, qweight, scales, mins, out, m, n, k, M_PAD=1 << max(m - 1, 0).bit_length(), BLOCK_N=cfg.block_n,
            BLOCK_K=block_k, G=g, EARLY=launch["PDL"] or early, num_warps=cfg.num_warps, **launch)
    else:
        cfg = gemm_config or default_gemm_config(m)
        _int4_gemm_kernel[(_cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n))](
            x2, qweight, scales, mins, out, m, n, k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, G=g,
            IEEE=x.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x2, pdl))
    return out.view(*x.shape[:-1], n)
