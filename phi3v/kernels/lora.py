"""Per-request LoRA for decode-sized batches (1..MAX_M rows) in two Triton kernels per linear layer:
y[m] += B_k @ (A_k @ x[m]) for each row m with adapter k = rows[m] > 0 (phi3v.models.lora holds the stacks).

The eager path (phi3v.models.lora.LoraSlot) is three kernels per layer (x @ A_all.T, the rows' mask, the expand
into y) over every adapter's rank. Here:
- shrink: grid (K / BLOCK_K, M): each program multiplies one K chunk of row m's adapter A_k (r_k x BLOCK_K) by x[m]
  and stores the (r_k,) fp32 partial: the whole shrink is spread over the GPU (one program per chunk, in one wave),
  not repeated by every output program;
- expand: grid (N / BLOCK_N,): each program sums a row's partials (in a fixed order: deterministic), expands them
  through its (r_k, BLOCK_N) tile of B and adds them into y in place.
A base-model row (rows[m] == 0) costs nothing but its programs' exit. Shapes are static and nothing is read on the
host: CUDA-graph safe, the adapter index a graph input. (A first version recomputed the whole shrink in every
expand program: docs/perf-log.md.)

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

# MAX_M: past it the eager path, whose cost does not grow with the rows. BLOCK_N 128: one wave of expand programs
# for every Phi-3 layer (gate_up: 16384 / 128 = 128 programs on 132 SMs). BLOCK_K 256: qkv's shrink is 12
# programs a row, down's 32.
MAX_M = 4
BLOCK_N = 128
BLOCK_K = 256


def supported(x: Tensor, a: Tensor) -> bool:
    """x (..., K): decode-sized, contiguous, on a device Triton runs on."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (HAVE_TRITON and available(x.device) and 1 <= m <= MAX_M and x.is_contiguous()
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and a.dtype == x.dtype)


def lora_add_(x: Tensor, y: Tensor, a: Tensor, bt: Tensor, rows: Tensor, offs: Tensor, rmax: int,
              pdl: bool = False) -> Tensor:
    """In place: y (..., N) += each row's adapter update of x (..., K); rows (M,) int64 (0 = base). `pdl`: launched
    with programmatic dependent launch (the shrink's launch overlaps the layer's GEMV before it)."""
    k, n = x.shape[-1], y.shape[-1]
    m = x.numel() // k
    chunks = triton.cdiv(k, BLOCK_K)
    part = torch.empty(m, chunks, rmax, device=x.device, dtype=torch.float32)  # (M, chunks, RMAX) partial shrinks
    _shrink_kernel[(chunks, m)](x, a, part, rows, offs, k, RMAX=rmax, BLOCK_K=BLOCK_K, num_warps=4,
                                **pdl_args(x, pdl))
    _expand_kernel[(triton.cdiv(n, BLOCK_N),)](part, bt, y, rows, offs, m, n, CHUNKS=chunks,
                                               CHUNKS_P2=triton.next_power_of_2(chunks), RMAX=rmax, BLOCK_N=BLOCK_N,
                                               num_warps=4)
    return y


if HAVE_TRITON:

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, part_ptr, rows_ptr, offs_ptr, K, RMAX: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr):
        pdl_start(PDL)  # x and rows come from earlier kernels
        c = tl.program_id(0)
        m = tl.program_id(1)
        idx = tl.load(rows_ptr + m)
        if idx > 0:
            start = tl.load(offs_ptr + idx - 1)
            r = tl.arange(0, RMAX)
            rmask = r < tl.load(offs_ptr + idx) - start
            kk = c * BLOCK_K + tl.arange(0, BLOCK_K)
            kmask = kk < K
            xv = tl.load(x_ptr + m * K + kk, mask=kmask, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + (start + r)[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0).to(tl.float32)  # (RMAX, BLOCK_K)
            tl.store(part_ptr + (m * tl.num_programs(0) + c) * RMAX + r, tl.sum(av * xv[None, :], axis=1))

    @triton.jit
    def _expand_kernel(part_ptr, bt_ptr, y_ptr, rows_ptr, offs_ptr, M, N, CHUNKS: tl.constexpr,
                       CHUNKS_P2: tl.constexpr, RMAX: tl.constexpr, BLOCK_N: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        r = tl.arange(0, RMAX)
        ch = tl.arange(0, CHUNKS_P2)
        for m in range(0, M):
            idx = tl.load(rows_ptr + m)
            if idx > 0:
                start = tl.load(offs_ptr + idx - 1)
                rmask = r < tl.load(offs_ptr + idx) - start
                pv = tl.load(part_ptr + (m * CHUNKS + ch)[:, None] * RMAX + r[None, :],
                             mask=(ch < CHUNKS)[:, None] & rmask[None, :], other=0.0)  # (CHUNKS_P2, RMAX)
                acc = tl.sum(pv, axis=0)  # (RMAX,) the row's shrink A_k @ x[m]
                bv = tl.load(bt_ptr + (start + r)[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                             other=0.0).to(tl.float32)  # (RMAX, BLOCK_N)
                out = tl.sum(bv * acc[:, None], axis=0)
                yp = y_ptr + m * N + cols
                yv = tl.load(yp, mask=cmask, other=0.0).to(tl.float32)
                tl.store(yp, (yv + out).to(y_ptr.dtype.element_ty), mask=cmask)
