"""y = x @ W.T for decode-sized x (1..8 rows) on CUDA (Triton), tuned by benchmarks/gemv_sweep.py.

At batch 1..8 a Phi-3-mini decode step is bound by streaming the weights once (7.6 GB per token), so a
GEMV's speed is the fraction of HBM bandwidth it reaches. Each program streams a (BLOCK_N, BLOCK_K) tile
of W per step, contiguous along K, and reuses it for every row of x. Small N (o_proj, down: 3072) gives
too few programs to fill 132 SMs, so K can be split: each split writes fp32 partials (splits, M, N) and a
second kernel sums them in a fixed order (deterministic, no atomics) and casts to x's dtype.

FP8 weights (`quantization="fp8"`): W in float8 e4m3 with one fp32 scale per output feature (row of W). The
tile is upcast in registers and the scale, constant along K, multiplies each program's sum once before it is
stored (a split's partial is scaled too: the sum of scaled partials is the scaled sum). Half the bytes of bf16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, available, gemv_dot, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_start, pdl_trigger, pdl_wait

MAX_M = 8
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 8  # output features (rows of W) per program; power of 2
    block_k: int = 512  # K elements per W tile load; power of 2
    split_k: int = 1  # K chunks per row block (more programs); fewer are launched if K is short
    num_warps: int = 4
    num_stages: int = 2  # pipelining depth of the K loop; only the dot path's loads get pipelined
    dot: bool = False  # tl.dot with x padded to 16 rows (tensor cores), else multiply-and-sum in fp32
    # fp8 weights only: the swap-AB tensor-core kernel of phi3v.kernels.gemv_dot instead ("a8": x quantized to e4m3
    # per row in the kernel, W8A8; "a16": W upcast to x's dtype); `dot` is then unused
    swap_ab: str = ""

    def __post_init__(self) -> None:
        for v in (self.block_n, self.block_k):
            assert v >= 1 and v & (v - 1) == 0, "block sizes must be powers of 2"
        assert self.split_k >= 1 and (not self.dot or min(self.block_n, self.block_k) >= 16), self
        assert self.swap_ab in ("",) + gemv_dot.SWAP_AB and (not self.swap_ab or (self.block_n >= 16 and
                                                                                  self.block_k >= 32)), self


# Measured winners, pasted from benchmarks/gemv_sweep.py's output; the comment is the speedup vs cuBLAS.
# (M, N, K): GemvConfig(block_n, block_k, split_k, num_warps, num_stages, dot)
# NVIDIA H100 80GB HBM3, bf16, Triton 3.6, torch 2.11, CUDA-graph replays over 32 weight copies (past L2)
BEST: dict[tuple[int, int, int], GemvConfig] = {
    (1, 9216, 3072): GemvConfig(2, 1024, 1, 2, 1, False),  # qkv 1.068x
    (2, 9216, 3072): GemvConfig(32, 128, 1, 2, 4, True),  # qkv 1.016x
    (4, 9216, 3072): GemvConfig(32, 128, 1, 2, 4, True),  # qkv 1.015x
    (8, 9216, 3072): GemvConfig(32, 128, 1, 2, 4, True),  # qkv 1.017x
    (1, 3072, 3072): GemvConfig(4, 1024, 1, 4, 1, False),  # o_proj 1.330x
    (2, 3072, 3072): GemvConfig(4, 512, 1, 2, 1, False),  # o_proj 1.199x
    (4, 3072, 3072): GemvConfig(32, 128, 4, 4, 3, True),  # o_proj 1.061x
    (8, 3072, 3072): GemvConfig(32, 128, 4, 4, 3, True),  # o_proj 1.063x
    (1, 16384, 3072): GemvConfig(4, 1024, 1, 2, 1, False),  # gate_up 1.081x
    (2, 16384, 3072): GemvConfig(64, 128, 1, 4, 3, True),  # gate_up 1.036x
    (4, 16384, 3072): GemvConfig(64, 128, 1, 4, 3, True),  # gate_up 1.037x
    (8, 16384, 3072): GemvConfig(64, 128, 1, 4, 3, True),  # gate_up 1.038x
    (1, 3072, 8192): GemvConfig(2, 2048, 1, 4, 1, False),  # down 1.147x
    (2, 3072, 8192): GemvConfig(2, 2048, 1, 4, 1, False),  # down 1.036x
    (4, 3072, 8192): GemvConfig(32, 128, 4, 4, 3, True),  # down 1.018x
    (8, 3072, 8192): GemvConfig(32, 128, 4, 4, 4, True),  # down 1.018x
    (1, 32064, 3072): GemvConfig(4, 1024, 1, 4, 1, False),  # lm_head 1.121x
    (2, 32064, 3072): GemvConfig(64, 128, 1, 2, 3, True),  # lm_head 1.068x
    (4, 32064, 3072): GemvConfig(64, 128, 1, 2, 3, True),  # lm_head 1.082x
    (8, 32064, 3072): GemvConfig(32, 256, 1, 2, 4, True),  # lm_head 1.077x
}


# FP8 weights (1 byte each): benchmarks/quant_sweep.py's winners at batch 1 (H200, CUDA-graph replays past L2,
# 2026-12-04 s10_a/s10_b; the comment is the weight GB/s, docs/perf-log.md; a variant with the next tile in flight
# never won, deleted since). Other shapes take their bf16 entry, with twice the K elements per tile on the FMA path: the same bytes per load.
BEST_FP8: dict[tuple[int, int, int], GemvConfig] = {
    (1, 9216, 3072): GemvConfig(8, 1024, 1, 4, 1, False),  # qkv 1,986
    (1, 3072, 3072): GemvConfig(8, 1024, 1, 4, 1, False),  # o_proj 1,553
    (1, 16384, 3072): GemvConfig(8, 1024, 1, 4, 1, False),  # gate_up 2,301
    (1, 3072, 8192): GemvConfig(8, 1024, 1, 4, 1, False),  # down 2,005
}


if HAVE_TRITON:

    @triton.jit
    def _w_tile(w_ptr, w_row, n_ok, k0, K, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
        # streamed once: evict_first keeps x and the partials in L2; contiguous along K either way
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if USE_DOT:  # (BLOCK_K, BLOCK_N)
            return tl.load(w_ptr + w_row[None, :] + ks[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0,
                           eviction_policy="evict_first")
        else:  # (BLOCK_N, BLOCK_K)
            return tl.load(w_ptr + w_row[:, None] + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                           eviction_policy="evict_first")

    @triton.jit
    def _gemv_step(x_ptr, w, acc, ms, m_ok, k0, K, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                   IEEE: tl.constexpr):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ms[:, None] * K + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :], other=0.0)
        if USE_DOT:  # an fp8 W tile is upcast to x's dtype first (a no-op for bf16 W)
            if IEEE:  # fp32 inputs: no TF32 rounding
                return tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
            else:
                return tl.dot(x, w.to(x.dtype), acc)
        else:
            return acc + x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, k_per_split, M_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                     HAS_SCALE: tl.constexpr, PDL: tl.constexpr):
        # grid (cdiv(N, BLOCK_N), splits); x (M, K), w (N, K), out (splits, M, N): the fp32 partials, or
        # directly y (M, N) in x's dtype when there is one split. k_per_split is a multiple of BLOCK_K.
        # HAS_SCALE: w is fp8 and scale (N,) fp32 multiplies output feature n.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
        ms = tl.arange(0, M_PAD)  # (M_PAD,) rows of x; those >= M are masked to 0
        n_ok = rows < N
        m_ok = ms < M
        w_row = rows.to(tl.int64) * K  # int64: N*K is 1e8 for lm_head, larger models overflow int32
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)  # the last split may be shorter
        if USE_DOT:
            acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        else:  # elementwise products, summed over K once after the loop (no shuffles inside it)
            acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
        start = k_lo
        if PDL:  # the first W tile is read before waiting for x: no kernel writes weights
            pdl_trigger(PDL)
            w = _w_tile(w_ptr, w_row, n_ok, k_lo, K, BLOCK_K, USE_DOT)
            pdl_wait(PDL)
            acc = _gemv_step(x_ptr, w, acc, ms, m_ok, k_lo, K, BLOCK_K, USE_DOT, IEEE)
            start = k_lo + BLOCK_K
        for k0 in range(start, k_hi, BLOCK_K):
            w = _w_tile(w_ptr, w_row, n_ok, k0, K, BLOCK_K, USE_DOT)
            acc = _gemv_step(x_ptr, w, acc, ms, m_ok, k0, K, BLOCK_K, USE_DOT, IEEE)
        if USE_DOT:
            y = acc
        else:
            y = tl.sum(acc, axis=2)  # (M_PAD, BLOCK_N)
        if HAS_SCALE:
            y = y * tl.load(scale_ptr + rows, mask=n_ok, other=0.0)[None, :]
        dst = out_ptr + pid_k * M * N + ms[:, None] * N + rows[None, :]  # splits * M * N < 2**31: int32
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _splitk_sum_kernel(part_ptr, out_ptr, MN, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # part (SPLITS, M*N) fp32 -> out (M*N) in out's dtype, summed in split order (deterministic)
        pdl_start(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def default_config(m: int, n: int, k: int, fp8: bool = False) -> GemvConfig:
    """BEST[(m, n, k)] (BEST_FP8 for fp8 weights), else the entry for the next larger tabled M of the same shape,
    else a heuristic."""
    if fp8:
        if (m, n, k) in BEST_FP8:  # measured at its own M only: more rows need a smaller tile (registers)
            return BEST_FP8[(m, n, k)]
        cfg = default_config(m, n, k)
        return cfg if cfg.dot else replace(cfg, block_k=min(2 * cfg.block_k, max(_pow2_at_least(k), 1)))
    for mm in range(m, MAX_M + 1):
        if (mm, n, k) in BEST:
            return BEST[(mm, n, k)]
    # Fallback, from the H100 sweep's winners: fp32 FMA with long K tiles for 1-2 rows, tensor cores beyond;
    # split K only while there are under 2 programs per SM (o_proj, down at block_n 32).
    dot = m > 2
    block_n, block_k, stages = (32, 128, 3) if dot else (4, 1024 if m == 1 else 512, 1)
    block_k = min(block_k, max(_pow2_at_least(k), 16 if dot else 1))
    split = 1
    while split < 8 and _cdiv(n, block_n) * split < 2 * 132 and k >= 2 * split * block_k:
        split *= 2
    return GemvConfig(block_n, block_k, split, num_warps=4, num_stages=stages, dot=dot)


def dot_splits(n: int, k: int, block_n: int, block_k: int, sms: int = 132) -> int:
    """K splits (a power of 2, at most 8) until the grid has 2 programs per SM, while each split keeps 2 tiles."""
    split = 1
    while split < 8 and _cdiv(n, block_n) * split < 2 * sms and k >= 4 * split * block_k:
        split *= 2
    return split


@functools.cache
def default_dot_config(n: int, k: int) -> GemvConfig:
    """The W8A8 tensor-core GEMV's config for fp8 weights (N, K) (QuantSpec.decode_dot). Not measured yet: tiles
    of benchmarks/gemv_compile.py's survivors (wgmma, no spills, few instructions per byte, ~96 KiB in flight per
    SM), 64 rows for N <= 4096 (more row blocks); quant_sweep.py's `best_by_kernel` a8 entries replace it once
    measured."""
    block_n, block_k = (128, 128) if n > 4096 else (64, 256)
    return GemvConfig(block_n, block_k, dot_splits(n, k, block_n, block_k // 2), num_warps=4, num_stages=3,
                      swap_ab="a8")


def supported(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> bool:
    """Whether linear() takes this: Triton on CUDA (or the interpreter), weight (N, K) contiguous,
    x (..., K) with 1..8 rows, of weight's dtype, or weight fp8 e4m3 with `scale` (N,) fp32."""
    if not HAVE_TRITON or weight.dim() != 2 or x.dim() < 1 or not weight.is_contiguous():
        return False
    n, k = weight.shape
    if k == 0 or n == 0 or x.shape[-1] != k or x.dtype not in _DTYPES:
        return False
    if scale is None:
        if x.dtype != weight.dtype:
            return False
    elif weight.dtype != FP8 or scale.shape != (n,) or scale.dtype != torch.float32 or scale.device != x.device:
        return False
    return 1 <= x.numel() // k <= MAX_M and x.device == weight.device and available(x.device)


def linear(x: Tensor, weight: Tensor, config: GemvConfig | None = None, pdl: bool = False,
           scale: Tensor | None = None) -> Tensor:
    """F.linear(x, weight) without bias for x (..., K) with at most 8 rows; check supported() first.
    With `scale` (N,) fp32, weight is fp8 e4m3 and output feature n is scaled by scale[n]; a config with
    `swap_ab` "a8" then quantizes x per row too (phi3v.kernels.gemv_dot: numerics of the FP8 prefill GEMM)."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    cfg = config or default_config(m, n, k, fp8=scale is not None)
    k_per_split = _cdiv(_cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = _cdiv(k, k_per_split)  # no empty splits when K is short
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    dst = out if splits == 1 else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    if cfg.swap_ab:
        assert scale is not None, "the swap-AB kernels are for fp8 weights"
        gemv_dot.launch_fp8(x2, weight, scale, dst, k_per_split, splits, cfg.block_n, cfg.block_k, cfg.swap_ab,
                            cfg.num_warps, cfg.num_stages, pdl)
    else:
        _gemv_kernel[(_cdiv(n, cfg.block_n), splits)](
            x2, weight, weight if scale is None else scale, dst, m, n, k, k_per_split,
            M_PAD=16 if cfg.dot else _pow2_at_least(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=cfg.dot,
            IEEE=x.dtype == torch.float32, HAS_SCALE=scale is not None, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **pdl_args(x2, pdl))
    if splits > 1:
        splitk_sum(dst, out, pdl)
    return out.view(*x.shape[:-1], n)


def splitk_sum(part: Tensor, out: Tensor, pdl: bool = False) -> None:
    """out (M, N) = part (splits, M, N) fp32 summed in split order (deterministic), cast to out's dtype."""
    mn = out.numel()
    _splitk_sum_kernel[(_cdiv(mn, 1024),)](part, out, mn, SPLITS=part.shape[0], BLOCK=1024, num_warps=4,
                                           **pdl_args(out, pdl))
