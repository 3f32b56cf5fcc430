"""GPU check of the tensor-core decode GEMVs of quantized weights (phi3v.kernels.gemv_dot, Int4GemvConfig.dot) at
Phi-3-vision's shapes, for every config benchmarks/quant_sweep.py times and the `decode_dot` defaults: fp8 W8A8
against its torch emulation (fp8_linear_reference(per_token=True)), W8A16 against the weight-only one, int4
against x @ dequant(W).T. On sm90 the kernels take paths the CPU interpreter does not (wgmma, asynchronous copies,
the inline-PTX int4 unpack of `Int4GemvConfig.asm`), so this is where those are checked. Bound: 5e-3 relative
(norm of the difference over the norm of y; bf16 output rounding alone is ~1e-3).

On the GPU machine: python -m pytest -m gpu tests/gpu/test_gpu_gemv_dot.py
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.quant_sweep import DOT_INT4, SWAP_FP8, with_splits
from phi3v.kernels import gemv, int4
from phi3v.models.quant import dequantize_int4, fp8_linear_reference, quantize_fp8, quantize_int4

pytestmark = pytest.mark.gpu


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("n,k", [(9216, 3072), (3072, 8192)])
def test_tensor_core_gemvs_match_torch(n: int, k: int, report) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    q, s = quantize_fp8(w)
    qi = quantize_int4(w, 128)
    w4 = dequantize_int4(*qi)
    errs: dict[str, float] = {}
    for rows in (1, 3, 8):
        x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
        refs = {a8: fp8_linear_reference(x, q, s, per_token=a8) for a8 in (False, True)}
        for c in with_splits(SWAP_FP8, n) + [gemv.default_dot_config(n, k)]:
            errs[f"fp8 m{rows} {c}"] = _rel(gemv.linear(x, q, c, scale=s), refs[c.swap_ab == "a8"])
        ref = x.float() @ w4.T
        for c in with_splits(DOT_INT4, n) + [int4.default_dot_config(n, k)]:
            errs[f"int4 m{rows} {c}"] = _rel(int4.linear(x, *qi, gemv_config=c), ref)
    bad = {name: e for name, e in errs.items() if not e < 5e-3}
    report({"shape": [n, k], "max_error": max(errs.values()), "configs": len(errs), "bad": bad})
    assert not bad
