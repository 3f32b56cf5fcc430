"""The tensor-core (swap-AB) decode GEMVs of quantized weights in Triton's CPU interpreter (a subprocess, as
test_quant_kernels.py): the fp8 W8A8 and W8A16 kernels (phi3v.kernels.gemv_dot through gemv.linear) and the int4
one (Int4GemvConfig.dot), against float references, with ragged N and K, K split unevenly, rows of very different
magnitude, and the layers' `decode_dot` routing.

Bounds, per output row (the worst row), relative to the row's largest |y| unless said:
- W8A8 against its exact emulation (phi3v.models.quant.fp8_linear_reference(per_token=True): x quantized per row
  to e4m3 with scale amax / 448, fp32 products): < 1e-4 (the kernel multiplies by 448 / amax where the emulation
  divides by amax / 448; they may differ in the last bit of a rare element);
- W8A8 against the float product with the same fp8 weights (the activation rounding alone), as the norm of the
  row's difference over the row's norm: between 1e-2 (x was quantized for real, to 3 mantissa bits: ~2-4 % here)
  and 5e-2 (the per-layer bound of phi3v/models/quant.py);
- W8A16 and int4 with fp32 x: < 1e-5 against x @ W (the weight-only numerics, no TF32);
- int4 with bf16 x: < 4e-3 (norms) against the fp32 product with the same x (the codes are exact in bf16 and
  scale and min are applied in fp32: only y's own rounding to bf16, 2**-9).
"""

import pytest
from interp import run_interpreted

SCRIPT = r"""
import torch
from phi3v.kernels import gemv, int4
from phi3v.kernels.gemv import GemvConfig
from phi3v.kernels.int4 import Int4GemvConfig
from phi3v.models.quant import (FP8Linear, Int4Linear, dequantize_int4, fp8_linear_reference, quantize_fp8,
                                quantize_int4)

torch.manual_seed(0)

def row_err(y, ref):  # worst row: largest |difference| over the largest |y|
    return ((y.float() - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-30)).max().item()

def row_rms(y, ref):  # worst row: norm of the difference over the norm of y
    return ((y.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()

A8 = [GemvConfig(16, 64, 1, swap_ab="a8"), GemvConfig(32, 128, 3, swap_ab="a8"),
      GemvConfig(64, 256, 2, 4, 2, swap_ab="a8")]
n_fp8 = 0
w8 = []
for n, k in [(37, 600), (64, 512), (20, 96)]:  # 600: two amax steps and a ragged last tile; 96: K < one tile
    q, s = quantize_fp8(torch.randn(n, k))
    w_ref = q.float() * s[:, None]
    for m in (1, 3, 8):
        x = torch.randn(m, k) * torch.logspace(-3, 2.5, m)[:, None]  # per-row scales from 1e-3 to 300
        exact = fp8_linear_reference(x, q, s, per_token=True)
        plain = x @ w_ref.T
        for cfg in A8:
            y = gemv.linear(x, q, cfg, scale=s)
            assert y.shape == (m, n) and y.dtype == torch.float32
            e_exact, e_plain = row_err(y, exact), row_rms(y, plain)
            assert e_exact < 1e-4, (n, k, m, cfg, e_exact)
            assert 1e-2 < e_plain < 5e-2, (n, k, m, cfg, e_plain)
            n_fp8 += 1
        y16 = gemv.linear(x, q, GemvConfig(16, 64, 2, swap_ab="a16"), scale=s)
        assert row_err(y16, plain) < 1e-5, row_err(y16, plain)
        n_fp8 += 1
# one scale per row over the whole row, whatever the split: the splits' partials add up to the unsplit result
x = torch.randn(2, 600)
q, s = quantize_fp8(torch.randn(40, 600))
y1 = gemv.linear(x, q, GemvConfig(16, 64, 1, swap_ab="a8"), scale=s)
y4 = gemv.linear(x, q, GemvConfig(16, 64, 4, swap_ab="a8"), scale=s)
assert row_err(y4, y1) < 1e-6 and torch.equal(y4, gemv.linear(x, q, GemvConfig(16, 64, 4, swap_ab="a8"), scale=s))
# an all-zero row stays zero next to a large one; bf16 in and out
x = torch.randn(2, 600)
x[0] = 0.0
assert torch.equal(gemv.linear(x, q, A8[1], scale=s)[0], torch.zeros(40))
xb = (torch.randn(1, 2, 600) * 5).bfloat16()
yb = gemv.linear(xb, q, A8[1], scale=s)
assert yb.shape == (1, 2, 40) and yb.dtype == torch.bfloat16
assert row_err(yb[0], fp8_linear_reference(xb[0], q, s, per_token=True)) < 1e-2  # bf16 output rounding

# int4: fp32 x exact, bf16 x dequantised in bf16
n_int4 = 0
for n, k, g in [(37, 256, 128), (20, 64, 64), (50, 384, 32)]:
    q, sc, mn = quantize_int4(torch.randn(n, k), g)
    w_ref = dequantize_int4(q, sc, mn)
    cfgs = [Int4GemvConfig(16, 0, 4, dot=True), Int4GemvConfig(32, 0, 4, dot=True, split_k=2),
            Int4GemvConfig(64, 0, 4, dot=True, num_stages=2, split_k=3),  # 3 splits of 12 groups, of 2: 2 of 1
            Int4GemvConfig(64, 0, 4, dot=True, asm=True)]  # inline PTX on the GPU only: here the plain path
    for m in (1, 3, 8):
        x = torch.randn(m, k)
        for cfg in cfgs:
            y = int4.linear(x, q, sc, mn, gemv_config=cfg)
            assert y.shape == (m, n) and row_err(y, x @ w_ref.T) < 1e-5, (n, k, g, m, cfg, row_err(y, x @ w_ref.T))
            xb = x.bfloat16()
            yb = int4.linear(xb, q, sc, mn, gemv_config=cfg)
            e16 = row_rms(yb, xb.float() @ w_ref.T)
            assert yb.dtype == torch.bfloat16 and e16 < 4e-3, (n, k, g, m, cfg, e16)
            n_int4 += 2

# the layers: decode_dot routes 1..8 rows to these kernels, with the numerics of their CPU path
fl, il = FP8Linear(128, 40), Int4Linear(128, 40, 64)
fl.quantize_(torch.randn(40, 128))
il.quantize_(torch.randn(40, 128))
fl.decode_dot = il.decode_dot = True
for x in (torch.randn(1, 1, 128), torch.randn(1, 6, 128)):
    assert row_err(fl.project(x, fused=True), fl.project(x, fused=False).float()) < 1e-4
    assert row_err(fl.project(x, fused=True), fp8_linear_reference(x[0], fl.weight, fl.weight_scale, False)) > 1e-3
    assert row_err(il.project(x, fused=True), il.project(x, fused=False)) < 1e-5
print("ok", n_fp8, n_int4)
"""


@pytest.mark.interpreter
@pytest.mark.slow
def test_tensor_core_gemvs_in_the_interpreter() -> None:
    out = run_interpreted(SCRIPT)
    assert out.startswith("ok"), out
