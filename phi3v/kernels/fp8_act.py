"""Dynamic per-token FP8 quantization of activations, the input of the FP8 prefill GEMM: one program per row
reads it twice (amax, then scale-and-cast; the row is in L2 the second time), in place of the five elementwise
torch kernels of `phi3v.models.quant.quantize_rows_fp8`, whose numerics it reproduces: scale = amax / 448
(at least 1e-12), q = e4m3(clamp(x / scale)), the division correctly rounded and the cast to nearest even.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.kernels import HAVE_TRITON, available, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from phi3v.kernels import pdl_start

FP8_MAX = 448.0

if HAVE_TRITON:
    _FP8_MAX = tl.constexpr(FP8_MAX)  # a jit function reads module globals only as constexprs (the GPU compiler
    # refuses a plain float; the CPU interpreter does not)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # grid (M,); x (M, K) -> q (M, K) e4m3, s (M,) fp32
        pdl_start(PDL)
        base = tl.program_id(0).to(tl.int64) * K
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + base + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / _FP8_MAX, 1e-12)
        for k0 in range(0, K, BLOCK):
            ok = k0 + offs < K
            x = tl.load(x_ptr + base + k0 + offs, mask=ok, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale + tl.zeros_like(x)), -_FP8_MAX), _FP8_MAX)
            tl.store(q_ptr + base + k0 + offs, q.to(tl.float8e4nv), mask=ok)
        tl.store(s_ptr + tl.program_id(0), scale)


def supported(x: Tensor) -> bool:
    """A 2-D x with rows, in bf16 / fp16 / fp32, where Triton runs."""
    return (HAVE_TRITON and x.dim() == 2 and x.shape[0] > 0 and x.shape[1] > 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and available(x.device))


def quantize_rows(x: Tensor, pdl: bool = False) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (q (M, K) e4m3, scale (M, 1) fp32) with x ~= q * scale, as quantize_rows_fp8."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = min(4096, triton.next_power_of_2(k))
    _quant_rows_kernel[(m,)](x, q, s, k, BLOCK=block, num_warps=8 if block >= 2048 else 4, **pdl_args(x, pdl))
    return q, s
