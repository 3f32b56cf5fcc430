"""Per-request LoRA in decode steps (1..8 rows of one token each): y[m] += B_k @ (A_k @ x[m]) for each row m with
adapter k = rows[m] > 0 (phi3v.models.lora holds the stacks and chooses the path).

A decode step's LoRA cost is its kernels' launches and dependency waits, not their bytes, so no step here is a kernel
of its own where another kernel can carry it:
- the shrink s = A_all @ x (every adapter's A stacked: R rows) rides in the layer's GEMV, run over [W; A_all]
  ((N + R, K), one buffer, phi3v.models.lora), which writes [y | s] (M, N + R) in one launch;
- the expand y[m] += bt[adapter k's columns].T @ s[m, adapter k's columns] is left pending (`LoraPending`) for the
  kernel that reads y next: the residual add + RMSNorm after o_proj and down_proj and the SiLU * up after
  gate_up_proj add it as they load y (phi3v.kernels.fused); qkv_proj's reader (the attention kernel) does not, so
  `expand` is one kernel there. `lora_delta` is the piece they share.
A base row (rows[m] == 0) adds exactly zero. Shapes are static and nothing is read on the host: CUDA-graph safe, the
rows' adapter index a graph input.

Layout: bt (R, N) contiguous (scale * B.T, each adapter's rank columns side by side), offs (n_adapters + 1,) int32 =
where adapter k's columns start (offs[k - 1]) and end (offs[k]); RMAX = the widest adapter (a power of 2, masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_trigger, pdl_wait

# expand: BLOCK_N output features per program, grid (N / BLOCK_N, M): one wave for every Phi-3 layer at batch 1.
BLOCK_N = 128
# rank columns of bt loaded at once: RC * BLOCK <= TILE values per program and step (registers)
TILE = 4096
# The norm adds a row's whole update in one program (RMAX x hidden FMAs on one SM: benchmarks/lora_compile.py counts
# its instructions); past this rank its issue time nears an expand kernel's launch, and the expand kernel runs first.
NORM_MAX_RMAX = 32
# SiLU * up adds the update over tiles of 256 features; past this rank its (RMAX, tile) block of B spills registers
# (benchmarks/lora_compile.py: 255 registers at 256) and the expand kernel runs first instead.
SILU_MAX_RMAX = 128


def lora_warps(rmax: int, base: int) -> int:
    """Warps of a kernel that adds an update of RMAX: `base` up to 16, twice that past it (no spills at Phi-3's sizes
    where they are used: benchmarks/lora_compile.py; fewer warps issue less per program)."""
    return base if rmax <= 16 else 2 * base


@dataclass(frozen=True)
class LoraPending:
    """A decode projection's output with its rows' LoRA updates still to add (see the module docstring).
    y (M, N) and s (M, R) may be column ranges of one (M, N + R) tensor (row strides y.stride(0), s.stride(0));
    shape: the finished output's (..., N)."""

    y: Tensor
    s: Tensor
    bt: Tensor
    rows: Tensor  # (M,) int64: each row's adapter, 0 = base
    offs: Tensor  # (n + 1,) int32
    rmax: int
    shape: tuple[int, ...]

    def kernel_args(self, block: int) -> dict:
        """The LoRA keyword arguments of a kernel that adds this update over output tiles of `block` features."""
        return {"s_ptr": self.s, "s_stride": self.s.stride(0), "bt_ptr": self.bt, "rows_ptr": self.rows,
                "offs_ptr": self.offs, "LORA": True, "RMAX": self.rmax, "RC": rank_chunk(self.rmax, block)}


def no_lora_args(like: Tensor) -> dict:
    """The same arguments for a launch with nothing pending (never read)."""
    return {"s_ptr": like, "s_stride": 0, "bt_ptr": like, "rows_ptr": like, "offs_ptr": like, "LORA": False,
            "RMAX": 1, "RC": 1}


def rank_chunk(rmax: int, block: int) -> int:
    return max(1, min(rmax, TILE // block))


def expand(p: LoraPending, pdl: bool = False) -> Tensor:
    """The finished output (p.shape, contiguous, a new tensor): y + each row's update. One kernel."""
    m, n = p.y.shape
    out = torch.empty(m, n, device=p.y.device, dtype=p.y.dtype)
    _expand_kernel[(triton.cdiv(n, BLOCK_N), m)](p.y, p.y.stride(0), out, n, BLOCK_N=BLOCK_N,
                                                  **p.kernel_args(BLOCK_N), **pdl_args(p.y, pdl))
    return out.view(p.shape)


if HAVE_TRITON:

    @triton.jit
    def _adapter(rows_ptr, offs_ptr, m):
        # row m's adapter: its first rank column and its rank (0 for a base row: every load below masked off)
        idx = tl.load(rows_ptr + m)
        start = tl.load(offs_ptr + tl.maximum(idx - 1, 0))
        return start, tl.where(idx > 0, tl.load(offs_ptr + idx) - start, 0)

    @triton.jit
    def _bt_tile(bt_ptr, start, rank, r0, cols, cmask, N, RC: tl.constexpr):
        # (RC, BLOCK) fp32: rows start + r0 .. of bt at output features `cols` (of N)
        r = r0 + tl.arange(0, RC)
        return tl.load(bt_ptr + (start + r)[:, None] * N + cols[None, :], mask=(r < rank)[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _times_s(s_ptr, start, rank, r0, b, RC: tl.constexpr):
        # (BLOCK,) fp32: sum over the tile's rank columns of s[start + r] * b[r, :]
        r = r0 + tl.arange(0, RC)
        s = tl.load(s_ptr + start + r, mask=r < rank, other=0.0).to(tl.float32)
        return tl.sum(b * s[:, None], axis=0)

    @triton.jit
    def lora_delta(s_ptr, bt_ptr, rows_ptr, offs_ptr, m, cols, cmask, N, BLOCK: tl.constexpr, RMAX: tl.constexpr,
                   RC: tl.constexpr):
        """(BLOCK,) fp32: row m's LoRA update at output features `cols` (of N): the sum over its adapter's rank
        columns j of s[j] * bt[j, cols], RC columns at a time in a fixed order; s_ptr points at row m's shrink (R,).
        Zero for a base row, which skips the work."""
        start, rank = _adapter(rows_ptr, offs_ptr, m)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        if rank > 0:
            for r0 in tl.static_range(0, RMAX, RC):
                acc += _times_s(s_ptr, start, rank, r0, _bt_tile(bt_ptr, start, rank, r0, cols, cmask, N, RC), RC)
        return acc

    @triton.jit
    def _expand_kernel(y_ptr, y_stride, out_ptr, N, s_ptr, s_stride, bt_ptr, rows_ptr, offs_ptr,
                       LORA: tl.constexpr, RMAX: tl.constexpr, RC: tl.constexpr, BLOCK_N: tl.constexpr,
                       PDL: tl.constexpr):
        # grid (cdiv(N, BLOCK_N), M): out[m, cols] = y[m, cols] + row m's update, rounded once to y's dtype. The
        # whole (RMAX, BLOCK_N) tile of bt at once (RC unused), read before waiting for the GEMV: no kernel of the
        # step writes bt, the rows' adapters or offs (the rows are copied in before the step's first kernel).
        pdl_trigger(PDL)
        m = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        start, rank = _adapter(rows_ptr, offs_ptr, m)
        b = _bt_tile(bt_ptr, start, rank, 0, cols, cmask, N, RMAX)
        pdl_wait(PDL)  # y and s come from the GEMV before
        d = _times_s(s_ptr + m * s_stride, start, rank, 0, b, RMAX)
        y = tl.load(y_ptr + m * y_stride + cols, mask=cmask, other=0.0)
        tl.store(out_ptr + m * N + cols, (y.to(tl.float32) + d).to(out_ptr.dtype.element_ty), mask=cmask)
