"""The quantized-weight Triton kernels against torch references, in Triton's CPU interpreter (a subprocess,
as test_gemv.py): the FP8 GEMV (phi3v.kernels.gemv with a scale), the int4 GEMV and the int4 GEMM
(phi3v.kernels.int4). Small shapes with ragged N and M, several groups per row, K shorter than a tile."""

from interp import run_interpreted

SCRIPT = r"""
import torch
from phi3v.kernels import fp8_act, gemv, int4
from phi3v.kernels.gemv import GemvConfig
from phi3v.kernels.int4 import Int4GemmConfig, Int4GemvConfig
from phi3v.models.quant import dequantize_int4, quantize_fp8, quantize_int4, quantize_rows_fp8

torch.manual_seed(0)

def rel(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()

# FP8 GEMV: x (M, K) fp32 times W upcast from e4m3, times the per-row scale, = x @ (q * s).T exactly in fp32
n_fp8 = 0
for n, k in [(37, 200), (64, 512)]:
    q, s = quantize_fp8(torch.randn(n, k))
    w_ref = q.float() * s[:, None]
    for m in (1, 3, 8):
        x = torch.randn(m, k)
        ref = x @ w_ref.T
        for cfg in (None, GemvConfig(block_n=8, block_k=64, split_k=3), GemvConfig(16, 32, split_k=2, dot=True)):
            assert gemv.supported(x, q, s)
            y = gemv.linear(x, q, cfg, scale=s)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert rel(y, ref) < 1e-5, (n, k, m, cfg, rel(y, ref))
            n_fp8 += 1
q, s = quantize_fp8(torch.randn(16, 64))
assert not gemv.supported(torch.randn(1, 64), q)  # fp8 weight without its scale
assert not gemv.supported(torch.randn(1, 64), q, s.double())
assert not gemv.supported(torch.randn(1, 64), torch.randn(16, 64), s)  # a scale for a float weight

# int4: the GEMV (<= 8 rows) and the GEMM (more rows) = x @ dequant(W).T
n_int4 = 0
for n, k, g in [(37, 256, 128), (20, 64, 64), (50, 384, 32)]:  # 2, 1 and 12 groups a row; N not a tile multiple
    w = torch.randn(n, k)
    q, sc, mn = quantize_int4(w, g)
    ref_w = dequantize_int4(q, sc, mn)
    assert int4.group_size(q, sc) == g
    for m in (1, 8, 40):
        x = torch.randn(2, m, k)[1]  # a view: linear() copies it contiguous
        ref = x @ ref_w.T
        cfgs = (dict(), dict(gemv_config=Int4GemvConfig(block_n=8, block_k=g, num_warps=2)),
                dict(gemm_config=Int4GemmConfig(block_m=16, block_n=16, num_warps=2, num_stages=1)))
        for cfg in cfgs:
            assert int4.supported(x, q, sc, mn)
            y = int4.linear(x, q, sc, mn, early=m == 1, **cfg)  # the first tile read ahead (PDL's order)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert rel(y, ref) < 1e-5, (n, k, g, m, cfg, rel(y, ref))
            n_int4 += 1
# leading dims, half precision in and out (fp32 accumulation)
w = torch.randn(24, 128)
q, sc, mn = quantize_int4(w, 64)
x = torch.randn(2, 3, 128).half()
y = int4.linear(x, q, sc, mn)
assert y.shape == (2, 3, 24) and y.dtype == torch.float16
assert rel(y, x.float() @ dequantize_int4(q, sc, mn).T) < 1e-2
assert not int4.supported(torch.randn(1, 127), q, sc, mn)
assert not int4.supported(torch.randn(1, 128).double(), q, sc, mn)
assert not int4.supported(torch.randn(1, 128), q.int(), sc, mn)
q16, sc16, mn16 = quantize_int4(torch.randn(8, 64), 16)  # group 16: not a kernel group size
assert not int4.supported(torch.randn(1, 64), q16, sc16, mn16)

# per-token activation quantization (the FP8 prefill GEMM's input): bit for bit torch's, rows longer than a block
for m, k in [(3, 200), (2, 5000)]:
    x = torch.randn(m, k) * torch.tensor([1.0, 1e-3, 300.0][:m])[:, None]
    x[0, 7] = 0.0
    q, s = fp8_act.quantize_rows(x)
    q_ref, s_ref = quantize_rows_fp8(x)
    assert s.shape == (m, 1) and torch.equal(s, s_ref), (s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
q, s = fp8_act.quantize_rows(torch.zeros(1, 64))
assert torch.equal(q.float(), torch.zeros(1, 64)) and abs(s.item() - 1e-12) < 1e-18  # an all-zero row

# the layers route to the kernels when the fused switch is on, and agree with their unfused (CPU) path
from phi3v.models.quant import FP8Linear, Int4Linear, fp8_linear_reference
fl, il = FP8Linear(128, 40), Int4Linear(128, 40, 64)
fl.quantize_(torch.randn(40, 128))
il.quantize_(torch.randn(40, 128))
x1 = torch.randn(1, 1, 128)
assert rel(fl.project(x1, fused=True), fp8_linear_reference(x1[0], fl.weight, fl.weight_scale, False)) < 1e-5
for x in (x1, torch.randn(1, 12, 128)):
    assert rel(il.project(x, fused=True), il.project(x, fused=False)) < 1e-5
print("ok", n_fp8, n_int4)
"""


def test_quantized_kernels_match_torch_in_the_interpreter() -> None:
    out = run_interpreted(SCRIPT)
    assert out.startswith("ok"), out
