"""Per-request LoRA for decode-sized batches (1..MAX_M rows) in one Triton kernel per linear layer:
y[m] += B_k @ (A_k @ x[m]) for each row m with adapter k = rows[m] > 0 (phi3v.models.lora holds the stacks).

The eager path (phi3v.models.lora.LoraSlot) is three kernels per layer (x @ A_all.T, the rows' mask, the expand
into y), each a few microseconds of launch and latency for almost no work: at batch 1 a decode step's 128 targeted
layers would add ~400 of them to a ~500-kernel step. Here each program owns BLOCK_N output features: for every row
it recomputes that row's own shrink A_k @ x[m] (r_k x K, read from L2 by every program: r_k is small) in fp32, then
expands it through its (r_k, BLOCK_N) tile of B and adds it into y in place. A base-model row (rows[m] == 0) costs
nothing. Shapes are static and nothing is read on the host: CUDA-graph safe, the adapter index a graph input.

Layout: a (R, K) and bt (R, N) contiguous (bt = scale * B.T, each adapter's rank columns side by side), offs
(n_adapters + 1,) int32 = where adapter k's columns start (offs[k - 1]) and end (offs[k]); RMAX = the widest
adapter (a power of 2, masked).
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, available, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_start

# Not tuned on a GPU yet (benchmarks/lora_bench.py measures the cost). MAX_M: past it the eager path, whose cost
# does not grow with the rows, should win (here each row repeats its shrink). BLOCK_N 128: one wave of programs for
# every Phi-3 layer (gate_up: 16384 / 128 = 128 programs on 132 SMs). BLOCK_K 512: the shrink's K loop is serial
# (not pipelined: no tl.dot), so few, wide steps (qkv 6, down 16).
MAX_M = 4
BLOCK_N = 128
BLOCK_K = 512


def supported(x: Tensor, a: Tensor) -> bool:
    """x (..., K): decode-sized, contiguous, on a device Triton runs on."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (HAVE_TRITON and available(x.device) and 1 <= m <= MAX_M and x.is_contiguous()
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and a.dtype == x.dtype)


def lora_add_(x: Tensor, y: Tensor, a: Tensor, bt: Tensor, rows: Tensor, offs: Tensor, rmax: int,
              pdl: bool = False) -> Tensor:
    """In place: y (..., N) += each row's adapter update of x (..., K); rows (M,) int64 (0 = base). `pdl`: launched
    with programmatic dependent launch (its launch overlaps the layer's GEMV before it)."""
    k, n = x.shape[-1], y.shape[-1]
    m = x.numel() // k
    grid = (triton.cdiv(n, BLOCK_N),)
    _lora_kernel[grid](x, a, bt, y, rows, offs, m, n, k, RMAX=rmax, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
                       **pdl_args(x, pdl))
    return y


if HAVE_TRITON:

    @triton.jit
    def _lora_kernel(x_ptr, a_ptr, bt_ptr, y_ptr, rows_ptr, offs_ptr, M, N, K,
                     RMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)  # x, y and rows come from earlier kernels
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        r = tl.arange(0, RMAX)
        for m in range(0, M):
            idx = tl.load(rows_ptr + m)
            if idx > 0:
                start = tl.load(offs_ptr + idx - 1)
                rmask = r < tl.load(offs_ptr + idx) - start
                acc = tl.zeros((RMAX,), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):  # the row's shrink: A_k (r, K) @ x[m]
                    kk = k0 + tl.arange(0, BLOCK_K)
                    kmask = kk < K
                    xv = tl.load(x_ptr + m * K + kk, mask=kmask, other=0.0).to(tl.float32)
                    av = tl.load(a_ptr + (start + r)[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                                 other=0.0).to(tl.float32)
                    acc += tl.sum(av * xv[None, :], axis=1)
                bv = tl.load(bt_ptr + (start + r)[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                             other=0.0).to(tl.float32)  # (RMAX, BLOCK_N)
                out = tl.sum(bv * acc[:, None], axis=0)
                yp = y_ptr + m * N + cols
                yv = tl.load(yp, mask=cmask, other=0.0).to(tl.float32)
                tl.store(yp, (yv + out).to(y_ptr.dtype.element_ty), mask=cmask)
