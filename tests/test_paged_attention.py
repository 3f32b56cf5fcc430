"""The paged decode-attention Triton kernel against the gather fallback, in Triton's CPU interpreter
(a subprocess: the interpreter must be chosen before triton is imported). fp32, GQA (4 query heads
on 2 KV heads), head_dim 96 (not a power of two), rows of length 0, mid-block and many blocks,
block tables in scrambled order, 1 and 4 KV splits; the kernel must also store the new K/V, and, given q/k
unrotated with cos/sin, rotate them itself exactly as kernels.rope_qk does."""

import pytest
from interp import run_interpreted

ROPE_CHECK = r"""
def rope_fused_equals_rotated(cache, lengths, bt, width, n, HQ, HKV, D, before, nsplit):
    # RoPE inside the kernel (q, k unrotated + cos/sin) equals rotating first with kernels.rope_qk:
    # outputs and stored K/V bytes bit-equal
    from phi3v.kernels import fused as kernels
    cs, sn = torch.randn(n, D), torch.randn(n, D)
    raw = torch.randn(n, (HQ + 2 * HKV) * D)
    rot = kernels.rope_qk(raw, cs, sn, HQ, HKV, D)  # (n, HQ + HKV, D)
    heads = raw.view(n, HQ + 2 * HKV, 1, D)
    outs = []
    for fused in (False, True):
        cache.k.copy_(before[0]); cache.v.copy_(before[1])
        att = DecodeAttention(cache, lengths, bt, width, nsplit)
        assert att.fused_rope
        if fused:
            o = att(0, heads[:, :HQ], heads[:, HQ:HQ + HKV], heads[:, HQ + HKV:], rope=(cs, sn))
        else:
            o = att(0, rot[:, :HQ, None], rot[:, HQ:, None], heads[:, HQ + HKV:])
        outs.append((o, cache.k.view(torch.uint8).clone(), cache.v.view(torch.uint8).clone()))
    assert not torch.equal(rot[:, :HQ], raw.view(n, -1, D)[:, :HQ])  # the rotation does something
    assert all(torch.equal(a, b) for a, b in zip(*outs)), (HQ, nsplit)
"""

SCRIPT = r"""
import torch
from phi3v.kernels import paged_attention
from phi3v.engine.kv_cache import DecodeAttention, KVCache
torch.manual_seed(0)
L, NB, HKV, HQ, BS, D = 2, 24, 2, 4, 16, 96
cache = KVCache(L, NB, BS, HKV, D, "cpu", torch.float32)
assert cache.triton
cache.k.normal_(); cache.v.normal_()
lengths = torch.tensor([0, 37, 100, 16])
perm = torch.randperm(NB).int()
bt = torch.full((4, 8), cache.scratch, dtype=torch.int32)
bt[0, :1] = perm[:1]; bt[1, :3] = perm[1:4]; bt[2, :7] = perm[4:11]; bt[3, :2] = perm[11:13]
q, k, v = torch.randn(4, HQ, 1, D), torch.randn(4, HKV, 1, D), torch.randn(4, HKV, 1, D)
ref_k, ref_v = cache.k.clone(), cache.v.clone()
cache.triton = False
ref = DecodeAttention(cache, lengths, bt, 101)(1, q, k, v)
want_k, want_v = cache.k.clone(), cache.v.clone()
for nsplit in (1, 4):
    cache.k.copy_(ref_k); cache.v.copy_(ref_v)
    cache.triton = True
    got = DecodeAttention(cache, lengths, bt, 101, nsplit)(1, q, k, v)
    assert got.shape == ref.shape, got.shape
    d = (got - ref).abs().max().item()
    assert d < 1e-5, (nsplit, d)
    assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v), "new K/V not stored where expected"
""" + ROPE_CHECK + r"""for nsplit in (1, 4):
    rope_fused_equals_rotated(cache, lengths, bt, 101, 4, HQ, HKV, D, (ref_k, ref_v), nsplit)
from phi3v.kernels import fused as kernels
kk, vv = torch.randn(40, 6, D)[:, 1:1 + HKV], torch.randn(40, HKV, D)  # k: a strided view, as in the model
blk, off = torch.randint(0, NB, (40,)), torch.randint(0, BS, (40,))
keys = set(zip(blk.tolist(), off.tolist()))
sel = torch.tensor([list(zip(blk.tolist(), off.tolist())).index(p) for p in keys])  # one writer per place
blk, off, kk, vv = blk[sel], off[sel], kk[sel], vv[sel]
want_k, want_v = cache.k[0].clone(), cache.v[0].clone()
want_k[blk, :, off], want_v[blk, :, off] = kk, vv
kernels.store_kv(kk, vv, cache.k[0], cache.v[0], blk, off)
assert torch.equal(cache.k[0], want_k) and torch.equal(cache.v[0], want_v)
assert [paged_attention.num_splits(b, 32) for b in (1, 2, 8, 16, 48, 64)] == [16, 8, 8, 4, 2, 1]
print("ok", d)
"""


@pytest.mark.interpreter
@pytest.mark.slow
def test_paged_decode_kernel_matches_gather_attention_in_the_interpreter() -> None:
    assert run_interpreted(SCRIPT).startswith("ok")


# The engine on the tiny checkpoint, every kernel interpreted (paged decode attention with RoPE inside, the fused
# norms and activations), gives the tokens of its torch fallbacks. Two prompts of 15 and 14 tokens in 16-token KV
# blocks: with 5 tokens each, both rows' decode steps (positions 15-18 and 14-17) cross into a second block.
ENGINE_CHECK = r"""
from phi3v import LLM, SamplingParams
from phi3v.kernels import gemv
gemv.MAX_M = 0  # the GEMV has its own test; interpreting it over the 32k-row lm_head takes minutes
llm = LLM("tests/data/tiny-phi3v", device="cpu", dtype="fp32", max_num_seqs=4, max_model_len=256, kv_block_size=16,
          kv_cache_dtype=KV_CACHE_DTYPE)
eng = llm.engine
assert eng.cache.triton and llm.model.fused and eng.cache.k.dtype == KV_STORAGE, eng.cache.k.dtype
prompts = ["<|user|>\nHello there, who are you?<|end|>\n<|assistant|>\n", "<|user|>\nCount: one two three.<|end|>\n<|assistant|>\n"]
reqs = [llm.prepare(p, [], SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts]
assert [len(r.prompt_ids) for r in reqs] == [15, 14]
kern = [c.token_ids for c in llm.generate_many(reqs)]
eng.cache.triton = False
llm.model.set_kernels(False)
plain = [c.token_ids for c in llm.generate_many(reqs)]
assert kern == plain, (kern, plain)
"""

ENGINE_SCRIPT = r"""
import torch
KV_CACHE_DTYPE, KV_STORAGE = "auto", torch.float32
""" + ENGINE_CHECK + r"""print("ok", kern)
"""


@pytest.mark.interpreter
@pytest.mark.slow
def test_engine_with_paged_kernel_and_fused_kernels_equals_plain_torch_in_the_interpreter() -> None:
    assert run_interpreted(ENGINE_SCRIPT).startswith("ok")


FP8_SCRIPT = r"""
import torch
from phi3v.kernels import paged_attention
from phi3v.engine.kv_cache import FP8, DecodeAttention, KVCache
from phi3v.kernels import fused as kernels
""" + ROPE_CHECK + r"""torch.manual_seed(1)
L, NB, HKV, BS, D = 1, 12, 2, 16, 96
for HQ in (4, 2):  # GQA: the tl.dot form; one query head per kv head (Phi-3): the fp32-FMA form
    cache = KVCache(L, NB, BS, HKV, D, "cpu", torch.float32, FP8)
    assert cache.k.dtype == FP8 and cache.triton
    cache.k.copy_((torch.randn(cache.k.shape) * 3).to(FP8)); cache.v.copy_((torch.randn(cache.v.shape) * 3).to(FP8))
    lengths = torch.tensor([5, 40, 0])
    bt = torch.full((3, 4), cache.scratch, dtype=torch.int32)
    bt[0, :1] = torch.tensor([7]); bt[1, :3] = torch.tensor([2, 9, 4]); bt[2, :1] = torch.tensor([0])
    q, k, v = torch.randn(3, HQ, 1, D), torch.randn(3, HKV, 1, D) * 3, torch.randn(3, HKV, 1, D)
    k[1, 0, 0, 5] = 1000.0  # beyond e4m3's range: saturates to 448, never NaN
    if HQ == HKV:  # row 1, position 30 (block 9, offset 14): a key whose score jumps ~20 above the others,
        cache.k[0, 9, 0, 14] = (q[1, 0, 0] * 2.5).to(FP8)  # so that a running max is rescaled mid-row
    before = (cache.k.clone(), cache.v.clone())
    cache.triton = False
    ref = DecodeAttention(cache, lengths, bt, 41)(0, q, k, v)
    want = (cache.k.view(torch.uint8).clone(), cache.v.view(torch.uint8).clone())
    assert float(cache.k[0, 4, 0, 40 % 16, 5]) == 448.0  # position 40: third block (4), offset 8
    for nsplit, tile in ((1, 64), (1, 16), (2, 16), (4, 16), (4, 64)):
        paged_attention.CONFIGS["fp8"] = (tile, 2, 1)  # tiles of 16: rows span several
        cache.k.copy_(before[0]); cache.v.copy_(before[1])
        cache.triton = True
        got = DecodeAttention(cache, lengths, bt, 41, nsplit)(0, q, k, v)
        d = (got - ref).abs().max().item()
        assert d < 1e-5 and not got.isnan().any(), (HQ, nsplit, tile, d)
        assert torch.equal(cache.k.view(torch.uint8), want[0]) and torch.equal(cache.v.view(torch.uint8), want[1])
    paged_attention.CONFIGS["fp8"] = (16, 2, 1)
    rope_fused_equals_rotated(cache, lengths, bt, 41, 3, HQ, HKV, D, before, 2)
paged_attention.CONFIGS["fp8"] = (64, 2, 1)
# half-precision activations: the kernel's dots run in fp16 on the widened fp8 values
c16 = KVCache(L, NB, BS, HKV, D, "cpu", torch.float16, FP8)
c16.k.copy_(before[0]); c16.v.copy_(before[1])
q16, k16, v16 = q.half(), k.half(), v.half()
c16.triton = False
ref16 = DecodeAttention(c16, lengths, bt, 41)(0, q16, k16, v16).float()
want16 = (c16.k.view(torch.uint8).clone(), c16.v.view(torch.uint8).clone())
c16.k.copy_(before[0]); c16.v.copy_(before[1])
c16.triton = True
got16 = DecodeAttention(c16, lengths, bt, 41, 2)(0, q16, k16, v16).float()
rel = ((got16 - ref16).norm() / ref16.norm()).item()
assert rel < 2e-3, rel
assert torch.equal(c16.k.view(torch.uint8), want16[0]) and torch.equal(c16.v.view(torch.uint8), want16[1])
# the prefill store: rounded like torch's cast, saturated
kk, vv = torch.randn(6, HKV, D) * 100, torch.randn(6, HKV, D)
blk, off = torch.tensor([1, 1, 3, 3, 5, 6]), torch.tensor([0, 1, 2, 3, 4, 5])
kernels.store_kv(kk, vv, cache.k[0], cache.v[0], blk, off)
assert torch.equal(cache.k[0][blk, :, off].float(), kk.clamp(-448, 448).to(FP8).float())
assert torch.equal(cache.v[0][blk, :, off].float(), vv.to(FP8).float())
# the engine with the fp8 cache too
KV_CACHE_DTYPE, KV_STORAGE = "fp8", FP8
""" + ENGINE_CHECK + r"""print("ok", d)
"""


@pytest.mark.interpreter
@pytest.mark.slow
def test_fp8_kv_cache_kernels_match_the_torch_fallbacks_in_the_interpreter() -> None:
    """fp8 (e4m3) KV storage: the decode kernel widens cached K/V and rounds the new token as the
    fallback does, stores saturate at +-448 instead of overflowing to NaN, and the whole engine
    gives the same tokens with the kernels as without."""
    assert run_interpreted(FP8_SCRIPT).startswith("ok")


def test_unrotated_qk_without_the_kernel_is_refused() -> None:
    import pytest
    import torch

    from phi3v.engine.kv_cache import DecodeAttention, KVCache

    cache = KVCache(1, 4, 16, 2, 8, "cpu", torch.float32)
    cache.triton = False  # the gather fallback cannot rotate
    att = DecodeAttention(cache, torch.tensor([3]), torch.zeros(1, 2, dtype=torch.int32), 4)
    assert not att.fused_rope
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="fused_rope"):
        att(0, q, k, k, rope=(torch.ones(1, 8), torch.zeros(1, 8)))
    assert att(0, q, k, k).shape == (1, 2, 1, 8)  # rotated q/k (no rope=) take the fallback as before


def test_cache_slots_map_each_position_to_its_block_and_offset() -> None:
    import torch
    from phi3v.engine.kv_cache import KVCache

    cache = KVCache(1, 8, 4, 1, 2, "cpu", torch.float32)
    blocks = [5, 2, 7]  # positions 0-3 in block 5, 4-7 in block 2, 8-11 in block 7
    where = cache.slots(blocks, 3, 10)
    assert where.dtype == torch.long and where.shape == (2, 7)
    assert where[0].tolist() == [5, 2, 2, 2, 2, 7, 7]
    assert where[1].tolist() == [3, 0, 1, 2, 3, 0, 1]
    assert cache.slots(blocks, 0, 0).shape == (2, 0)
