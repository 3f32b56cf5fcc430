"""GPU check of the TMA variant of the paged prefill attention (phi3v/kernels/prefill_hopper.py) before it is timed:
at Phi-3-vision's shapes (32 heads, head_dim 96, 64-token blocks, bf16), each config of benchmarks/long_prefill.py's
SWEEP_TMA against the pointer kernel (CONFIGS["bf16"], the measured default) on the same later chunk of a prompt
with a scattered block table: a past that ends mid-block, a chunk whose length is no multiple of the tiles. The
interpreter runs the variant's arithmetic on the CPU (tests/test_paged_prefill.py); this checks what it cannot:
the TMA boxes, swizzled shared memory, wgmma and the register caps on sm90.

On the GPU machine: python -m pytest -m gpu tests/gpu/test_prefill_tma_check.py
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.long_prefill import SWEEP_TMA
from phi3v.kernels import paged_prefill
from phi3v.kernels.paged_prefill import PrefillConfig, paged_prefill_attention

pytestmark = pytest.mark.gpu
H, D, BS = 32, 96, 64


@pytest.fixture(scope="module")
def chunk() -> dict:
    """A 1,000-token chunk after a 3,000-token past (mid-block), its K/V as the model hands them (strided views)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    start, t_len, n_blocks = 3000, 1000, 120
    kc = torch.randn(n_blocks, H, BS, D, device="cuda", generator=g).bfloat16() * 2
    vc = torch.randn(n_blocks, H, BS, D, device="cuda", generator=g).bfloat16()
    bt = torch.randperm(n_blocks, device="cuda", generator=g)[: -(-start // BS)]
    qkv = torch.randn(t_len, 3 * H, D, device="cuda", generator=g).bfloat16()
    q, k, v = qkv[:, :H], qkv[:, H: 2 * H] * 2, qkv[:, 2 * H:]
    ref = paged_prefill_attention(q, kc, vc, bt, start, k, v, config=paged_prefill.CONFIGS["bf16"])
    return dict(q=q, kc=kc, vc=vc, bt=bt, start=start, k=k, v=v, ref=ref.float())


@pytest.mark.parametrize("text", SWEEP_TMA)
def test_tma_variant_equals_the_pointer_kernel(text: str, chunk: dict, report) -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90")
    c = chunk
    got = paged_prefill_attention(c["q"], c["kc"], c["vc"], c["bt"], c["start"], c["k"], c["v"],
                                  config=PrefillConfig.parse(text)).float()
    err = (got - c["ref"]).abs().max().item()
    rel = ((got - c["ref"]).norm() / c["ref"].norm()).item()
    report({"config": text, "max_abs_diff": err, "rel_diff": rel})
    assert rel < 1e-2 and err < 5e-2, (text, err, rel)
