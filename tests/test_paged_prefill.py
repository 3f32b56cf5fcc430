"""The paged prefill-attention Triton kernel (phi3v/kernels/paged_prefill.py) against a plain torch
reference (the past gathered through the block table, causal lower-right attention in fp32), in
Triton's CPU interpreter (a subprocess: the interpreter must be chosen before triton is imported).

Covered: a first chunk (start 0) and later ones, key tiles within one block and across two, chunk lengths not a multiple of BLOCK_M, pasts not a
multiple of the block size nor of BLOCK_N, shuffled block tables read through a strided view, GQA (4
query heads on 2 kv heads), head_dim 48 and 24 (not powers of 2: split 32+16, 16+8) and 32 (one part),
the chunk's K/V from the cache or from the layer's tensors, an fp8 cache, fp16 and bf16 activations;
then PrefillAttention with the kernel against its SDPA path, and the engine's chunked prefill."""

from interp import run_interpreted

SCRIPT = r"""
import torch
from phi3v.kernels.paged_prefill import PrefillConfig, paged_prefill_attention
FP8 = torch.float8_e4m3fn

def reference(q, kc, vc, bt, start, k=None, v=None):
    # fp32: the past (and the chunk, unless k/v given) gathered from the cache, keys 0..start+T-1,
    # query i (position start+i) sees key j when j <= start+i
    T, hq, d = q.shape
    bs = kc.shape[2]
    pos = torch.arange(start + T)
    blk, off = bt.long()[pos // bs], pos % bs
    K, V = kc[blk, :, off].float(), vc[blk, :, off].float()  # (S, Hkv, D)
    if k is not None:
        K[start:], V[start:] = k.float(), v.float()
    g = hq // K.shape[1]
    K, V = K.repeat_interleave(g, 1), V.repeat_interleave(g, 1)
    s = torch.einsum("thd,shd->hts", q.float(), K) / d ** 0.5
    seen = pos[None, :] <= start + torch.arange(T)[:, None]
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)
    return torch.einsum("hts,shd->thd", p, V)

def case(start, T, hq, hkv, d, cfg, dtype=torch.float32, kv=None, new_from_cache=False, bs=16, seed=0):
    torch.manual_seed(seed)
    nb = (start + T + bs - 1) // bs
    kc = torch.randn(nb + 3, hkv, bs, d) * 2
    vc = torch.randn(nb + 3, hkv, bs, d)
    kc, vc = kc.to(kv or dtype), vc.to(kv or dtype)
    table = torch.randperm(nb + 3)[:nb]  # shuffled, and read through a strided view
    bt = torch.zeros(nb, 3, dtype=torch.int64); bt[:, 1] = table
    bt = bt[:, 1]
    q = (torch.randn(T, hq, d) * 2).to(dtype)
    k, v = (torch.randn(T, hkv, d) * 2).to(dtype), torch.randn(T, hkv, d).to(dtype)
    if new_from_cache:  # the chunk as the cache holds it: positions start.. written there
        pos = torch.arange(start, start + T)
        kc[table[pos // bs], :, pos % bs] = k.to(kc.dtype)
        vc[table[pos // bs], :, pos % bs] = v.to(vc.dtype)
        k = v = None
    qv = torch.randn(hq, T, d).to(dtype).transpose(0, 1)  # q as the model hands it: (T, H, D) strided
    qv.copy_(q)
    got = paged_prefill_attention(qv, kc, vc, bt, start, k, v, config=cfg)
    assert got.shape == (T, hq, d) and got.dtype == dtype
    ref = reference(q, kc, vc, bt, start, k, v)
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    err = (got.float() - ref).abs().max().item()
    return err, rel

small, wide = PrefillConfig(32, 16, 4, 1), PrefillConfig(16, 16, 4, 1)
checks = [  # (what, kwargs, max abs err)
    ("first chunk, GQA, d=48", dict(start=0, T=37, hq=4, hkv=2, d=48, cfg=small), 1e-5),
    ("later chunk, past 50 (mid-block, mid-tile), chunk from the cache", dict(start=50, T=37, hq=2, hkv=2, d=48,
     cfg=small, new_from_cache=True), 1e-5),
    ("past 64 (block-aligned), GQA, d=24", dict(start=64, T=20, hq=4, hkv=2, d=24, cfg=small), 1e-5),
    ("past 33, T=1, square tiles", dict(start=33, T=1, hq=2, hkv=1, d=48, cfg=wide), 1e-5),
    ("past 70, d=32 (one part), 64-token blocks", dict(start=70, T=45, hq=2, hkv=2, d=32, cfg=small, bs=64), 1e-5),
    ("32-key tiles over 16-token blocks (a tile spans two)", dict(start=80, T=40, hq=2, hkv=2, d=48,
     cfg=PrefillConfig(64, 32, 4, 1)), 1e-5),
    ("fp8 cache, chunk from the layer", dict(start=45, T=30, hq=4, hkv=2, d=48, cfg=small, kv=FP8), 1e-5),
    ("fp8 cache, chunk from the cache", dict(start=45, T=30, hq=2, hkv=2, d=24, cfg=small, kv=FP8,
     new_from_cache=True), 1e-5),
]
for what, kw, tol in checks:
    err, rel = case(**kw)
    assert err < tol, (what, err)
# half precision: P is rounded to the activation dtype before the second product, the output once at the end
for dtype, kv, tol in ((torch.float16, None, 2e-3), (torch.bfloat16, None, 1e-2), (torch.float16, FP8, 2e-3)):
    err, rel = case(start=40, T=33, hq=4, hkv=2, d=48, cfg=small, dtype=dtype, kv=kv)
    assert rel < tol, (dtype, kv, rel)
# a wrong reference would not pass: the kernel's output depends on the past
q = torch.randn(5, 2, 24); kc = torch.randn(4, 2, 16, 24); bt = torch.arange(4)
a = paged_prefill_attention(q, kc, kc, bt, 20, q, q, config=small)
kc[bt[0], :, 3] += 1
assert not torch.equal(a, paged_prefill_attention(q, kc, kc, bt, 20, q, q, config=small))
print("ok")
"""


def test_paged_prefill_kernel_matches_the_gathered_reference_in_the_interpreter() -> None:
    assert run_interpreted(SCRIPT).startswith("ok")


WIRING_SCRIPT = r"""
import torch
from phi3v.kernels import paged_prefill
from phi3v.engine.kv_cache import FP8, KVCache, PrefillAttention, PrefillKernelOptions

# PrefillAttention: the kernel (past read in place) equals the SDPA path (past gathered), bf16-free fp32
torch.manual_seed(0)
BS, HKV, D = 16, 2, 48
for kv in (None, FP8):
    cache = KVCache(2, 12, BS, HKV, D, "cpu", torch.float32, kv)
    assert cache.triton
    blocks = torch.randperm(12)[:8].tolist()
    T0, T1 = 40, 29  # a first chunk, then one starting mid-block
    where = cache.slots(blocks, 0, T0 + T1)
    q0, k0, v0 = torch.randn(1, 4, T0, D), torch.randn(1, HKV, T0, D), torch.randn(1, HKV, T0, D)
    q1, k1, v1 = torch.randn(1, 4, T1, D), torch.randn(1, HKV, T1, D), torch.randn(1, HKV, T1, D)
    outs = []
    for triton in (False, True):
        cache.triton = triton
        cache.k.zero_(); cache.v.zero_()
        PrefillAttention(cache, where[0, :T0], where[1, :T0], 0)(1, q0, k0, v0)
        outs.append(PrefillAttention(cache, where[0, T0:], where[1, T0:], T0, (where[0, :T0], where[1, :T0]))(
            1, q1, k1, v1))
    assert outs[1].shape == (1, 4, T1, D)
    err = (outs[0] - outs[1]).abs().max().item()
    assert err < 1e-5, (kv, err)
    # "all": the first chunk too (no past), against SDPA's causal attention
    cache.triton = True
    a = PrefillAttention(cache, where[0, :T0], where[1, :T0], 0, kernel=PrefillKernelOptions("all"))(1, q0, k0, v0)
    cache.triton = False
    b = PrefillAttention(cache, where[0, :T0], where[1, :T0], 0)(1, q0, k0, v0)
    assert (a - b).abs().max().item() < 1e-5
    before = (cache.k.clone(), cache.v.clone())
    paged_prefill.warmup(cache.k[0], cache.v[0], 4, torch.float32)  # compiles; the cache is left as it was
    assert torch.equal(cache.k.view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(cache.v.view(torch.uint8), before[1].view(torch.uint8))

# the engine's chunked prefill (20-token chunks over 16-token blocks), the prefill kernel interpreted, the rest in
# torch (fused kernels off: interpreting them takes minutes): the same tokens as with the SDPA path
from phi3v import LLM, SamplingParams
from phi3v.engine.config import EngineConfig
from phi3v.engine.engine import Engine
llm = LLM("tests/data/tiny-phi3v", device="cpu", dtype="fp32", max_num_seqs=1, max_model_len=256, kv_block_size=16,
          fused_kernels=False)
assert not llm.model.fused
prompt = ("<|user|>\nCount slowly: one two three four five six seven eight nine ten eleven twelve, then back down: "
          "twelve eleven ten nine eight seven six five four three two one.<|end|>\n<|assistant|>\n")
req = llm.prepare(prompt, [], SamplingParams(max_tokens=2, ignore_eos=True))
assert len(req.prompt_ids) > 40, len(req.prompt_ids)  # three chunks, the last one mid-block
eng = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=1, max_model_len=256, kv_block_size=16, prefill_chunk=20, long_prefill_chunk=20,
                                                 fused_kernels=False, enable_prefix_caching=False))
calls = []
orig = paged_prefill.paged_prefill_attention
paged_prefill.paged_prefill_attention = lambda *a, **k: calls.append(a[4]) or orig(*a, **k)
got = []
for triton in (True, False):
    eng.cache.triton = triton
    rid = eng.add_request(req.prompt_ids, req.images, req.params)
    got.append(eng.run_to_completion()[rid])
assert got[0] == got[1], got
assert calls and calls[:2] == [20, 20] and 0 not in calls, calls  # later chunks only, each layer
print("ok", got)
"""


TMA_SCRIPT = SCRIPT.split("small, wide")[0] + r"""
# the TMA variant (phi3v/kernels/prefill_hopper.py): tensor descriptors, which the interpreter runs, against the
# same reference; key tiles of one box and of two cache blocks, head_dim in two parts and padded
two, one, pad = (PrefillConfig.parse(t) for t in ("32,32,4,1,tma", "32,16,4,2,tma,r128", "32,32,4,1,tma,pad"))
wide = PrefillConfig.parse("16,32,4,1,tma")  # key tiles wider than the query tile (two blocks per tile)
assert two.text() == "32,32,4,1,tma" and one.maxnreg == 128 and pad.pad
from phi3v.kernels import prefill_hopper
calls = []
_launch = prefill_hopper.launch
prefill_hopper.launch = lambda *a, **k: calls.append(a[-1]) or _launch(*a, **k)
checks = [
    ("past 50 (mid-block), GQA, d=48 (32 + 16)", dict(start=50, T=37, hq=4, hkv=2, d=48), (two, one, pad, wide)),
    ("first chunk (no past)", dict(start=0, T=20, hq=2, hkv=2, d=48), (two, pad, wide)),
    ("past 64 (block-aligned), d=32 (one part), T=1", dict(start=64, T=1, hq=2, hkv=1, d=32), (two, one)),
    ("past 70 in 64-token blocks, d=24", dict(start=70, T=45, hq=2, hkv=2, d=24, bs=64), (two, pad)),
]
for what, kw, cfgs in checks:
    for cfg in cfgs:
        err, rel = case(cfg=cfg, **kw)
        assert err < 1e-5, (what, cfg, err)
err, rel = case(start=40, T=33, hq=4, hkv=2, d=48, cfg=two, dtype=torch.bfloat16)
assert rel < 1e-2, rel
assert len(calls) == 12 and set(calls) == {two, one, pad, wide}, calls  # the TMA kernel ran each of those
# where the variant does not apply (the chunk from the cache, an fp8 cache) the pointer kernel runs: still right
assert case(start=50, T=37, hq=2, hkv=2, d=48, cfg=two, new_from_cache=True)[0] < 1e-5
assert case(start=45, T=30, hq=4, hkv=2, d=48, cfg=two, kv=FP8)[0] < 1e-5
assert case(start=20, T=9, hq=2, hkv=2, d=12, cfg=two, dtype=torch.bfloat16)[1] < 1e-2  # 24-byte rows: no TMA
# a variant's tile the pointer kernel cannot run (query tile narrower than the key tile) falls back to the pointer
# kernel's own tile, not to that one
assert case(start=45, T=30, hq=4, hkv=2, d=48, cfg=wide, kv=FP8)[0] < 1e-5
assert case(start=50, T=37, hq=2, hkv=2, d=48, cfg=PrefillConfig.parse("16,32,4,2,gluon"), new_from_cache=True)[0] < 1e-5
assert len(calls) == 12
# the Gluon variant does not run here (no interpreter for Gluon; tests/gpu/test_prefill_tma_check.py checks it): with
# the whole prompt's table and no k/v, as PrefillAttention calls it, the pointer kernel reads every key from the cache
gl = PrefillConfig.parse("64,16,4,2,gluon")
assert gl.variant == "gluon" and gl.text() == "64,16,4,2,gluon"
assert case(start=50, T=37, hq=4, hkv=2, d=48, cfg=gl, new_from_cache=True)[0] < 1e-5
from phi3v.engine.kv_cache import KVCache, PrefillAttention, PrefillKernelOptions
cache = KVCache(1, 12, 16, 2, 48, "cpu", torch.float32, None)
blocks = torch.randperm(12)[:8].tolist()
where = cache.slots(blocks, 0, 69)
qkv = [torch.randn(1, h, n, 48) for n in (40, 29) for h in (4, 2, 2)]
outs = []
for opts in (PrefillKernelOptions("all"), PrefillKernelOptions("all", {"fp32": gl})):
    cache.k.zero_(); cache.v.zero_()
    PrefillAttention(cache, where[0, :40], where[1, :40], 0, kernel=opts)(0, *qkv[:3])
    outs.append(PrefillAttention(cache, where[0, 40:], where[1, 40:], 40, (where[0, :40], where[1, :40]),
                                 kernel=opts)(0, *qkv[3:]))
assert (outs[0] - outs[1]).abs().max().item() < 1e-5
from phi3v.kernels import paged_prefill
before = cache.k.clone()
paged_prefill.warmup(cache.k[0], cache.v[0], 4, torch.float32, {"fp32": gl})  # the engine's warm-up, that config
assert torch.equal(cache.k, before)
# PHI3V_PREFILL_ATTN_CONFIG (cli.engine_switches) takes the variants
got = paged_prefill.parse_configs("bf16=128,64,4,2,gluon;fp8=128,64,8,3")
assert got["bf16"].variant == "gluon" and got["fp8"] == PrefillConfig(128, 64, 8, 3)
for bad in ("32,32,4,1,pad", "32,32,4,1,tma,ws", "32,32,4,1,r12x", "64,16,8,2,gluon", "64,16,4,2,tma,gluon"):
    try:
        PrefillConfig.parse(bad)
    except ValueError:
        continue
    raise AssertionError(bad)
print("ok")
"""


def test_tma_variant_matches_the_gathered_reference_in_the_interpreter() -> None:
    assert run_interpreted(TMA_SCRIPT).startswith("ok")


def test_prefill_attention_and_chunked_engine_with_the_kernel_equal_sdpa_in_the_interpreter() -> None:
    assert run_interpreted(WIRING_SCRIPT).startswith("ok")


SUFFIX_SCRIPT = r"""
import torch
from types import SimpleNamespace
from phi3v import LLM
from phi3v.engine.graphs import SuffixRunner, fill_suffix_inputs
from phi3v.engine.kv_cache import KVCache
from phi3v.engine.prefill import Prefiller

llm = LLM("tests/data/tiny-phi3v", device="cpu", dtype="fp32", max_model_len=512)
cfg, m = llm.config, llm.model
m.set_kernels(fused=False)  # plain torch around the attention: the interpreter runs only the kernels under test
for start, T, bucket in ((37, 5, 16), (3, 1, 16), (70, 40, 64)):
    caches = [KVCache(cfg.num_hidden_layers, 12, 16, cfg.num_key_value_heads,
                      cfg.hidden_size // cfg.num_attention_heads, "cpu", m.dtype) for _ in range(2)]
    assert caches[0].triton  # the interpreter; only the suffix step below runs the kernels (they are slow there)
    for c in caches:
        c.triton = False
    seq = SimpleNamespace(blocks=[5, 2, 7, 0, 3, 9, 11, 1], long_rope=False)
    x = torch.randn(start + T, cfg.hidden_size, generator=torch.Generator().manual_seed(start))
    out = []
    for cache, graphed in zip(caches, (False, True)):
        pre = Prefiller(m, cache, SimpleNamespace(bucket=lambda n: None), 4096, {"prefill_tokens": 0})
        pre.prefill_range(seq, x[:start], 0, False)  # the cached prefix
        if not graphed:  # the eager chunk after a cached prefix
            out.append(pre.prefill_range(seq, x[start:], start, True))
            continue
        cache.triton = True
        runner = SuffixRunner(m, cache, max_blocks=10, use_graphs=False)
        io = runner.buffers(bucket, x)  # what a graph of this bucket replays, run eagerly
        rows = torch.cat([torch.arange(start, start + T)[None], cache.slots(seq.blocks, start, start + T)])
        table = torch.full((10,), cache.scratch, dtype=torch.int32)
        table[:8] = torch.tensor(seq.blocks, dtype=torch.int32)
        fill_suffix_inputs(io, x[start:], rows, torch.tensor([False]), table, cache)
        out.append(runner.forward(io))
    torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)
    where = caches[0].slots(seq.blocks, 0, start + T)
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(a[:, where[0], :, where[1]], b[:, where[0], :, where[1]], atol=1e-5, rtol=1e-5)
    print("ok", start, T)
"""


def test_a_short_suffix_graph_step_equals_its_eager_prefill_in_the_interpreter() -> None:
    """What SuffixRunner replays on CUDA (a follow-up question's new tokens after the cached prefix, padded to a
    length bucket, start and T read on the device by the kernel), run eagerly in the interpreter: the same last
    logits and cache contents as the eager chunk after the same prefix; padding rows change nothing."""
    out = run_interpreted(SUFFIX_SCRIPT)
    assert out.count("ok") == 3, out


TWO_SUFFIXES_SCRIPT = r"""
import torch
from phi3v import LLM, SamplingParams
from phi3v.engine.config import EngineConfig
from phi3v.engine.engine import Engine

llm = LLM("tests/data/tiny-phi3v", device="cpu", dtype="fp32", max_num_seqs=4, max_model_len=256, kv_block_size=16,
          fused_kernels=False)
text = ("<|user|>\nCount slowly: one two three four five six seven eight nine ten eleven twelve, then back down: "
        "twelve eleven ten nine eight seven six five four three two one.<|end|>\n<|assistant|>\n")
ids = llm.prepare(text, [], SamplingParams()).prompt_ids
common = ids[:48]
A, B = common + ids[5:12], common + ids[20:30]  # both suffixes in the 16-token bucket
p = SamplingParams(max_tokens=4, ignore_eos=True)

eng = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=4, max_model_len=256, kv_block_size=16,
                                                 fused_kernels=False))
assert eng.runner.prefiller.suffix is not None
eng.cache.triton = False  # torch everywhere except the suffix step (SuffixAttention always runs the kernel)
r = eng.runner.suffix
r.use_graphs = True

class FakeGraph:  # what a CUDA graph does: each replay writes into the same static output buffer
    def __init__(self, fn):
        self.fn = fn
    def replay(self):
        self.fn()

def capture(b, like):
    io = r.buffers(b, like)
    io["logits"] = r.forward(io).clone()
    return FakeGraph(lambda: io["logits"].copy_(r.forward(io))), io

r._capture = capture
eng.add_request(common + [ids[3]], [], p)
eng.run_to_completion()  # caches the 48-token prefix
alone = []
for q in (A, B):
    rid = eng.add_request(q, [], p)
    alone.append(eng.run_to_completion()[rid])
ra, rb = eng.add_request(A, [], p), eng.add_request(B, [], p)
out = eng.run_to_completion()
assert eng.stats.get("suffix_graphs", 0) >= 4, eng.stats
assert [out[ra], out[rb]] == alone, (alone, [out[ra], out[rb]])
print("ok")
"""


def test_two_suffixes_in_one_step_keep_their_own_logits_in_the_interpreter() -> None:
    """Two follow-ups after one cached prefix, admitted together, replay the same bucket's graph one after the other
    in one prefill step: each keeps its own logits (a graph's output buffer is the next replay's) and gives the
    tokens it gives alone."""
    assert run_interpreted(TWO_SUFFIXES_SCRIPT).strip().endswith("ok")
