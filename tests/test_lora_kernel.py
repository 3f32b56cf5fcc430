"""The per-request LoRA decode kernel (phi3v/kernels/lora.py) against the eager stacks-and-mask math
(phi3v/models/lora.py), under Triton's CPU interpreter: rows of the base model, of each adapter, mixed, adapters of
different ranks (masked up to the widest), fp32 and bf16."""

from __future__ import annotations

import pytest

from interp import run_interpreted

pytestmark = pytest.mark.interpreter

SCRIPT = r"""
import torch
from phi3v.models.lora import LoraSet, LoraSlot
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    for K, N, ranks in ((96, 200, [4, 8, 3]), (300, 64, [16])):
        lset = LoraSet([f"a{i}" for i in range(len(ranks))], ranks, torch.device("cpu"), dtype)
        R = sum(ranks)
        slot = LoraSlot(lset, torch.randn(R, K).to(dtype), torch.randn(R, N).to(dtype))
        for rows in ([0], [1], [len(ranks)], [len(ranks), 0, 1, 1]):
            x = torch.randn(len(rows), 1, K).to(dtype)
            y0 = torch.randn(len(rows), 1, N).to(dtype)
            lset.select(torch.tensor(rows))
            ref = slot.add(x, y0.clone(), fused=False)
            got = slot.add(x, y0.clone(), fused=True)
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert err < tol, (dtype, K, N, rows, err)
            if rows == [0]:
                assert torch.equal(got, y0)  # a base row is left as it was
print("ok")
"""


def test_lora_kernel_matches_the_eager_math() -> None:
    assert run_interpreted(SCRIPT).strip().endswith("ok")
