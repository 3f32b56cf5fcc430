"""The opt-in fp8 (e4m3) KV cache on the tiny checkpoint (CPU, torch paths; the Triton kernels are
checked against these paths in test_paged_attention.py).

fp8 changes the numerics on purpose, so the engine is checked against a slow reference that
recomputes the whole sequence every step with the cache's rounding spelled out: a query attends to
a key (and its value) rounded through e4m3 exactly when the engine would have read that key from
the cache, i.e. when it belongs to an earlier prefill chunk or the query is a decoded token (a
decode step reads every position from the cache, its own included)."""

from __future__ import annotations

import math

import pytest
import torch

from phi3v import LLM, SamplingParams
from phi3v.engine.config import EngineConfig
from phi3v.engine.engine import Engine
from phi3v.engine.kv_cache import FP8

from engine_common import PROMPTS, image_path


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    return LLM(tiny_ckpt, device="cpu", dtype="fp32", max_num_seqs=4, max_model_len=2048, kv_cache_dtype="fp8")


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448, 448).to(FP8).to(x.dtype)


class RoundedCacheAttention:
    """Causal attention over one whole sequence (q, k, v: (1, H, T, D)) where query i sees key j
    through fp8 when chunk[j] < chunk[i] or i is decoded (chunk ids: prompt chunks, then one per token)."""

    def __init__(self, n_prompt: int, chunk: int, total: int) -> None:
        ids = [p // chunk for p in range(n_prompt)]
        ids += [ids[-1] + 1 + t for t in range(total - n_prompt)]
        c = torch.tensor(ids)
        decoded = torch.arange(total) >= n_prompt
        self.sel = (c[None, :] < c[:, None]) | decoded[:, None]  # (T, T): use the rounded key
        self.causal = torch.ones(total, total, dtype=torch.bool).tril()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = 1 / math.sqrt(q.shape[-1])
        s = torch.where(self.sel, q @ _rounded(k).transpose(-1, -2), q @ k.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~self.causal, float("-inf")), -1)  # (1, H, T, T)
        return (p * self.sel) @ _rounded(v) + (p * ~self.sel) @ v


@torch.inference_mode()
def rounded_reference(llm: LLM, req, max_tokens: int, chunk: int) -> list[int]:
    model = llm.model
    feats = model.encode_images([i.pixels() for i in req.images], [i.image_size for i in req.images])
    prompt = model.embed(torch.tensor(req.prompt_ids), feats)  # (P, hidden)
    out: list[int] = []
    for _ in range(max_tokens):
        x = torch.cat([prompt, model.model.embed_tokens(torch.tensor(out, dtype=torch.long))], 0)[None]
        n = x.shape[1]
        long_rope = torch.tensor([n > llm.config.original_max_position_embeddings])  # as reference_generate
        h = model(x, torch.arange(n)[None], long_rope, RoundedCacheAttention(prompt.shape[0], chunk, n))
        out.append(int(model.logits(h[:, -1]).argmax(-1)))
    return out


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_fp8_engine_equals_the_reference_with_the_cache_rounding(llm: LLM, i: int) -> None:
    prompt, names, nc = PROMPTS[i]
    req = llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=8, ignore_eos=True), nc)
    assert llm.engine.cache.k.dtype == FP8
    got = llm.generate_many([req])[0].token_ids
    assert got == rounded_reference(llm, req, 8, chunk=1 << 30)
    assert llm.engine.sched.all_free


def test_fp8_chunked_prefill_reads_earlier_chunks_back_rounded(llm: LLM) -> None:
    prompt, names, nc = PROMPTS[1]  # two images: several 100-token chunks
    req = llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=6, ignore_eos=True), nc)
    eng = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=1, max_model_len=1024, kv_block_size=16, prefill_chunk=100, long_prefill_chunk=100,
                 kv_cache_dtype="fp8"))
    rid = eng.add_request(req.prompt_ids, req.images, req.params)
    got = eng.run_to_completion()[rid]
    assert len(req.prompt_ids) > 300
    assert got == rounded_reference(llm, req, 6, chunk=100)
    assert eng.sched.all_free


def test_fp8_cache_holds_more_tokens_in_the_same_budget(llm: LLM) -> None:
    budget = 8 << 20  # below the cap of max_num_seqs full-length sequences for both
    exact = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=256, max_model_len=512, kv_budget_bytes=budget, kv_block_size=16))
    fp8 = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=256, max_model_len=512, kv_budget_bytes=budget, kv_block_size=16,
                 kv_cache_dtype="fp8"))
    assert fp8.cache.k.dtype == FP8 and exact.cache.k.dtype == torch.float32
    assert fp8.cache.n_blocks == 4 * exact.cache.n_blocks  # 1 byte per value instead of fp32's 4
    assert 2 * fp8.cache.k[:, :-1].numel() <= budget  # K and V at 1 byte, the scratch block aside


def test_unknown_kv_cache_dtype_is_refused_before_loading() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        LLM("/no/such/checkpoint", device="cpu", kv_cache_dtype="int4")
