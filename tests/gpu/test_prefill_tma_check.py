"""GPU check of the sm90 variants of the paged prefill attention (phi3v/kernels/prefill_hopper.py, TMA, and
prefill_gluon.py, Gluon) before they are timed:
at Phi-3-vision's shapes (32 heads, head_dim 96, 64-token blocks, bf16), each config of benchmarks/long_prefill.py's
SWEEP_TMA against the pointer kernel (CONFIGS["bf16"], the measured default) on the same later chunk of a prompt
with a scattered block table: a past that ends mid-block, a chunk whose length is no multiple of the tiles. The
interpreter runs the TMA variant's arithmetic on the CPU (tests/test_paged_prefill.py) but not Gluon; this checks
what it cannot: the TMA boxes, swizzled shared memory, wgmma and mbarrier phases, the register caps, and the Gluon
kernel at all.

On the GPU machine: python -m pytest -m gpu tests/gpu/test_prefill_tma_check.py
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.long_prefill import SWEEP_TMA
from phi3v.kernels import paged_prefill, prefill_gluon, prefill_hopper
from phi3v.kernels.paged_prefill import PrefillConfig, paged_prefill_attention

pytestmark = pytest.mark.gpu
H, D, BS = 32, 96, 64


@pytest.fixture(scope="module", params=[(3000, 1000), (4096, 777)], ids=["past-mid-block", "past-aligned"])
def chunk(request) -> dict:
    """A chunk after a past that ends mid-block (3,000 + 1,000 tokens) or on a block and tile boundary (4,096 + 777,
    a chunk no multiple of the tiles), its K/V as the model hands them (strided views of one qkv tensor) and, as
    PrefillAttention leaves them before attending, in the cache too."""
    g = torch.Generator(device="cuda").manual_seed(0)
    (start, t_len), n_blocks = request.param, 120
    kc = torch.randn(n_blocks, H, BS, D, device="cuda", generator=g).bfloat16() * 2
    vc = torch.randn(n_blocks, H, BS, D, device="cuda", generator=g).bfloat16()
    table = torch.randperm(n_blocks, device="cuda", generator=g)[: -(-(start + t_len) // BS)]
    qkv = torch.randn(t_len, 3 * H, D, device="cuda", generator=g).bfloat16()
    qkv[:, H: 2 * H] *= 2
    q, k, v = qkv[:, :H], qkv[:, H: 2 * H], qkv[:, 2 * H:]
    pos = torch.arange(start, start + t_len, device="cuda")
    kc[table[pos // BS], :, pos % BS] = k
    vc[table[pos // BS], :, pos % BS] = v
    past = table[: -(-start // BS)]
    ref = paged_prefill_attention(q, kc, vc, past, start, k, v, config=paged_prefill.CONFIGS["bf16"])
    return dict(q=q, kc=kc, vc=vc, past=past, table=table, start=start, k=k, v=v, ref=ref.float())


@pytest.mark.parametrize("text", SWEEP_TMA)
def test_variant_equals_the_pointer_kernel(text: str, chunk: dict, report) -> None:
    """Each config of the sweep, called as PrefillAttention calls it: the TMA variant with the past's table and
    the chunk's K/V, the Gluon kernel with the whole prompt's table (every key from the cache)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90")
    c, cfg = chunk, PrefillConfig.parse(text)
    if cfg.variant == "gluon":
        assert prefill_gluon.applies(c["q"], c["kc"], cfg), "the Gluon kernel would not run (Triton without Gluon?)"
        got = paged_prefill_attention(c["q"], c["kc"], c["vc"], c["table"], c["start"], config=cfg)
    else:
        assert prefill_hopper.applies(c["kc"], c["k"], c["v"])
        got = paged_prefill_attention(c["q"], c["kc"], c["vc"], c["past"], c["start"], c["k"], c["v"], config=cfg)
    got = got.float()
    err = (got - c["ref"]).abs().max().item()
    rel = ((got - c["ref"]).norm() / c["ref"].norm()).item()
    report({"config": text, "max_abs_diff": err, "rel_diff": rel})
    assert rel < 1e-2 and err < 5e-2, (text, err, rel)
