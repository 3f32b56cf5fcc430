"""The per-request LoRA decode path (phi3v/kernels/lora.py, the LoRA inputs of phi3v/kernels/fused.py, LoraSlot's
stacked [W; A] GEMV) under Triton's CPU interpreter, against the per-row math written here: rows of the base model, of
each adapter, mixed; adapters of different ranks (masked up to the widest); fp32 and bf16; the update added by its
own kernel, by the norm and by SiLU * up, and after a quantized layer's own projection (the shrink's GEMV)."""

from __future__ import annotations

import pytest

from interp import run_interpreted

pytestmark = pytest.mark.interpreter

SCRIPT = r"""
import torch
import torch.nn.functional as F
from phi3v.kernels import fused, gemv, lora as kernels
from phi3v.models.lora import LoraSet, LoraSlot
torch.manual_seed(0)

def per_row(x, w, a, bt, offs, rows):
    # y[m] = W x[m] + bt[k's columns].T @ (a[k's columns] @ x[m]), k = rows[m]; fp32 from the stored values
    y = x.float() @ w.float().t()
    for m, k in enumerate(rows):
        if k:
            c = slice(offs[k - 1], offs[k])
            y[m] += (a[c].float() @ x[m].float()) @ bt[c].float()
    return y

for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
    for K, N, ranks in ((96, 200, [4, 8, 3]), (300, 64, [16])):
        lset = LoraSet([f"a{i}" for i in range(len(ranks))], ranks, torch.device("cpu"), dtype)
        R, offs = lset.width, lset.offsets + [sum(ranks)]  # R padded to 16: columns no row owns (random here)
        w, a = (torch.randn(N, K) / K**0.5).to(dtype), (torch.randn(R, K) / K**0.5).to(dtype)
        bt = torch.randn(R, N).to(dtype)
        slot = LoraSlot(lset, a, bt, torch.cat([w, a]))
        quant = LoraSlot(lset, a, bt)  # a quantized layer's slot: no stacked buffer, y given
        for rows in ([0], [1], [len(ranks)], [len(ranks), 0, 1, 1], [0, 1, 0, 1, 0, 1, 1], [1, 0] * 5):  # 10: a GEMM
            M = len(rows)
            x = torch.randn(M, 1, K).to(dtype)
            lset.select(torch.tensor(rows))
            ref = per_row(x[:, 0], w, a, bt, offs, rows)
            base = gemv.linear(x, w) if M <= gemv.MAX_M else F.linear(x, w)  # the stacked GEMV's tile / the GEMM
            got = slot.project(x, fused=True)
            p = slot.project(x, fused=True, defer=True)
            assert isinstance(p, kernels.LoraPending) and p.y.stride(0) == N + R and p.shape == (M, 1, N)
            assert got.shape == (M, 1, N) and got.is_contiguous()
            q = quant.add(x, base.clone(), fused=True)
            for out in (got, q, slot.project(x, fused=False), quant.add(x, base.clone(), fused=False)):
                err = ((out[:, 0].float() - ref).abs().max() / ref.abs().max()).item()
                assert err < tol, (dtype, K, N, rows, err)
            for m, k in enumerate(rows):
                if k == 0 and M <= gemv.MAX_M:  # a base row is the base model's, bit for bit (the GEMV's tile)
                    assert torch.equal(got[m], base[m]) and torch.equal(q[m], base[m])
            # the norm and SiLU * up add a pending update as the expand kernel would
            res, nw = torch.randn(M, 1, N).to(dtype), torch.rand(N).to(dtype) + 0.5
            for limit, r in ((32, res), (32, None), (0, res)):  # limit 0: the expand kernel runs before the norm
                fused.NORM_MAX_RMAX = limit
                h1, r1 = fused.add_rms_norm(p, r, nw, 1e-5)
                h2, r2 = fused.add_rms_norm(got, r, nw, 1e-5)
                assert h1.shape == (M, 1, N) and r1.shape == (M, 1, N)
                assert (r1.float() - r2.float()).abs().max() <= tol * r2.float().abs().max(), (dtype, rows)
                assert (h1.float() - h2.float()).abs().max() <= tol * h2.float().abs().max() * 4, (dtype, rows)
            if N % 2 == 0:
                for limit in (128, 0):  # limit 0: the expand kernel runs before SiLU * up
                    fused.SILU_MAX_RMAX = limit
                    s1, s2 = fused.silu_mul(p), fused.silu_mul(got)
                    assert s1.shape == (M, 1, N // 2)
                    assert (s1.float() - s2.float()).abs().max() <= tol * s2.float().abs().max() * 4, (dtype, rows)
        lset.select(None)
print("ok")
"""


def test_lora_decode_kernels_match_the_per_row_math() -> None:
    assert run_interpreted(SCRIPT).strip().endswith("ok")
