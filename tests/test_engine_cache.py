"""Engine v2's mechanisms against the slow reference generator, token for token, on the tiny checkpoint: the
prefix cache (whole-prompt hits, follow-up questions, a second chat turn, partial last blocks, images at
other positions), preemption under memory pressure, the LongRoPE crossing with the image cache long evicted,
chunked long prompts between decode steps, and a failing sequence that fails alone."""

from __future__ import annotations

import os

import pytest
import torch

from phi3v import LLM, SamplingParams
from phi3v.engine.config import EngineConfig
from phi3v.engine.engine import Engine

from engine_common import CKPT, image_path, reference_tokens

TURN1 = "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n"


# PHI3V_TEST_DEVICE=cuda runs the same checks on the GPU (fp32, TF32 off: the reference's numbers), graphs,
# Triton kernels and run-ahead included: the GPU part of the engine check (device_call.sh gpu_tests)
DEVICE = os.environ.get("PHI3V_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def llm() -> LLM:
    if DEVICE != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    llm = LLM(CKPT, device=DEVICE, dtype="fp32", max_num_seqs=6, max_model_len=4096, kv_block_size=16)
    llm.warmup()
    return llm


@pytest.fixture(autouse=True)
def kv_memory_is_free_after_each_test(llm: LLM):
    llm.engine.reset_prefix_cache()
    yield
    eng = llm.engine
    eng.step()  # drains a run-ahead step still in flight, if any
    assert not eng.has_unfinished() and eng.sched.all_free and not eng.sched.seqs
    assert min(eng.sched.pool.refs) == 0


def common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_the_same_request_again_is_served_from_the_prefix_cache(llm: LLM) -> None:
    req = llm.prepare(TURN1, [image_path("astronaut")], greedy(12), 1)
    first = llm.generate_many([req])[0]
    again = llm.generate_many([req])[0]
    n = len(req.prompt_ids)
    assert first.usage["prompt_tokens_details"]["cached_tokens"] == 0
    # every full block but the one holding the last prompt token (its logits are needed)
    assert again.usage["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16 > 0
    assert first.token_ids == again.token_ids == reference_tokens(llm, req, 12)


def test_follow_up_question_and_second_chat_turn_hit_the_image_blocks(llm: LLM) -> None:
    img = [image_path("coffee")]
    t1 = llm.prepare(TURN1, img, greedy(16), 4)
    answer = llm.generate_many([t1])[0]
    follow = llm.prepare("<|user|>\n<|image_1|>\nWhat colour is the cup? Answer in one word.<|end|>\n<|assistant|>\n",
                         img, greedy(10), 4)
    turn2 = llm.prepare(TURN1 + answer.text + "<|end|>\n<|user|>\nAnd the background?<|end|>\n<|assistant|>\n",
                        img, greedy(10), 4)
    for req in (follow, turn2):
        c = llm.generate_many([req])[0]
        shared = common(t1.prompt_ids, req.prompt_ids)  # turn 1's prompt blocks were cached (not its answer's)
        assert c.usage["prompt_tokens_details"]["cached_tokens"] == shared // 16 * 16 > 100  # the image's blocks
        assert c.token_ids == reference_tokens(llm, req, 10)


def test_same_image_at_another_position_or_other_crops_is_not_a_hit(llm: LLM) -> None:
    a = llm.prepare(TURN1, [image_path("astronaut")], greedy(6), 1)
    llm.generate_many([a])
    shifted = llm.prepare("<|system|>\nYou are careful.<|end|>\n" + TURN1, [image_path("astronaut")], greedy(6), 1)
    crops = llm.prepare(TURN1, [image_path("astronaut")], greedy(6), 4)
    for req in (shifted, crops):
        c = llm.generate_many([req])[0]
        same = common(a.prompt_ids, req.prompt_ids)
        assert c.usage["prompt_tokens_details"]["cached_tokens"] <= same // 16 * 16
        assert c.token_ids == reference_tokens(llm, req, 6)


def test_requests_sharing_a_prefix_in_one_batch_and_a_partial_last_block(llm: LLM) -> None:
    """Several requests with the same image and different questions at once: the first computes the image's
    blocks, the others (admitted in later steps) take them. The shared part ends inside a block: that block
    is recomputed, never written in place."""
    img = [image_path("page_L")]
    reqs = [llm.prepare(f"<|user|>\n<|image_1|>\n{q}<|end|>\n<|assistant|>\n", img, greedy(8), 1)
            for q in ("Read it.", "Read it aloud, slowly.", "What language?")]
    outs = llm.generate_many(reqs)
    for r, c in zip(reqs, outs):
        assert c.token_ids == reference_tokens(llm, r, 8)
    outs2 = llm.generate_many(reqs[::-1])
    assert [c.token_ids for c in outs2] == [c.token_ids for c in outs][::-1]
    assert all(c.usage["prompt_tokens_details"]["cached_tokens"] > 0 for c in outs2)


def test_preemption_under_memory_pressure_gives_the_reference_tokens(llm: LLM) -> None:
    """KV for three of these prompts and a little more: three are admitted, then as they grow the newest running
    sequence is preempted when a block is missing, and every request still gives exactly the reference's
    tokens."""
    reqs = [llm.prepare(TURN1, [image_path(n)], greedy(40), 1) for n in ("astronaut", "coffee", "page_L", "logo_RGBA")]
    cfg = llm.config
    bpt = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32
    longest = max(len(r.prompt_ids) for r in reqs) + 40
    prompt = max(len(r.prompt_ids) for r in reqs)
    eng = Engine(llm.model, cfg, EngineConfig(max_num_seqs=4, max_model_len=longest + 16, kv_block_size=16,
                                              kv_budget_bytes=(3 * prompt + 48) * bpt, enable_prefix_caching=False))
    rids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs]
    got = eng.run_to_completion()
    assert eng.num_preemptions > 0
    assert [got[r] for r in rids] == [reference_tokens(llm, r, 40) for r in reqs]
    assert eng.sched.all_free and min(eng.sched.pool.refs) == 0


def test_preempted_seeded_sampling_continues_the_same_stream(llm: LLM) -> None:
    reqs = [llm.prepare(TURN1, [image_path(n)], SamplingParams(max_tokens=30, temperature=0.8, seed=i), 1)
            for i, n in enumerate(("astronaut", "coffee", "page_L"))]
    alone = [c.token_ids for c in llm.generate_many(reqs)]
    cfg = llm.config
    bpt = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    longest = max(len(r.prompt_ids) for r in reqs) + 30
    prompt = max(len(r.prompt_ids) for r in reqs)
    eng = Engine(llm.model, cfg, EngineConfig(max_num_seqs=3, max_model_len=longest + 16, kv_block_size=16,
                                              kv_budget_bytes=(3 * prompt + 48) * bpt))
    rids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs]
    got = eng.run_to_completion()
    assert eng.num_preemptions > 0
    assert [got[r][: len(a)] for r, a in zip(rids, alone)] == alone


@pytest.mark.parametrize("lookahead", [0, 64])
def test_long_rope_crossing_needs_no_evicted_image_features(llm: LLM, lookahead: int) -> None:
    """A request crossing original_max (512 in the tiny config) after many other images went through a
    one-entry image cache: it keeps its own features, recomputes with the long factors, and equals the
    reference; the other requests are untouched."""
    eng = llm.engine
    size = eng.runner.images.size
    crossing = llm.prepare(TURN1, [image_path("astronaut")], greedy(230), 1)  # max_len within one lookahead of 512
    assert len(crossing.prompt_ids) < 512 < len(crossing.prompt_ids) + 230 <= 512 + 64
    others = [llm.prepare(TURN1, [image_path(n)], greedy(4), nc) for n in ("coffee", "page_L", "logo_RGBA")
              for nc in (1, 4)]
    ahead = eng.sched.lookahead
    try:  # lookahead 64: blocks held ahead (as with run-ahead on CUDA, capped by max_len): the recomputed sequence's new
        # block table has as many blocks as its old one, and must still replace it in the decode batch
        eng.runner.images.size, eng.sched.lookahead = 1, max(ahead, lookahead)
        outs = llm.generate_many([crossing] + others)
    finally:
        eng.runner.images.size, eng.sched.lookahead = size, ahead
    assert outs[0].token_ids == reference_tokens(llm, crossing, 230)
    assert [c.token_ids for c in outs[1:]] == [reference_tokens(llm, r, 4) for r in others]


def test_long_prompt_in_chunks_while_another_request_streams(llm: LLM) -> None:
    eng = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=2, max_model_len=4096, kv_block_size=16,
                                                     prefill_chunk=100, long_prefill_chunk=100))
    eng.sched.max_prefill_tokens = 200  # a 1.2k-token prompt over 6 prefill steps
    short = llm.prepare(TURN1, [image_path("logo_RGBA")], greedy(30), 1)
    long = llm.prepare("<|user|>\n" + "<|image_1|>\n" * 4 + "All four.<|end|>\n<|assistant|>\n",
                       [image_path("coffee")], greedy(5), 1)
    assert len(long.prompt_ids) > 1000
    a = eng.add_request(short.prompt_ids, short.images, short.params)
    eng.step()
    b = eng.add_request(long.prompt_ids, long.images, long.params)
    got: dict[str, list[int]] = {a: [], b: []}
    short_tokens_during_prefill = 0
    while eng.has_unfinished():
        for o in eng.step():
            got[o.rid] += o.token_ids
        if not got[b] and eng.has_unfinished():
            short_tokens_during_prefill = len(got[a])
    assert short_tokens_during_prefill >= 5  # the short request kept streaming between the long one's chunks
    assert got[a] == reference_tokens(llm, short, 30) and got[b] == reference_tokens(llm, long, 5)


def test_a_failing_sequence_fails_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [llm.prepare(TURN1, [image_path(n)], greedy(6), 1) for n in ("astronaut", "coffee", "page_L")]
    bad_key = reqs[1].images[0].key
    real = llm.model.embed

    def embed(ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        if any(f is llm.engine.runner.images.cache.get(bad_key) for f in feats):
            raise RuntimeError("boom")
        return real(ids, feats)

    monkeypatch.setattr(llm.model, "embed", embed)
    outs = llm.generate_many(reqs)
    assert isinstance(outs[1], RuntimeError) and "boom" in str(outs[1])
    assert [outs[0].token_ids, outs[2].token_ids] == [reference_tokens(llm, reqs[i], 6) for i in (0, 2)]


def test_requests_without_max_tokens_reserve_nothing_ahead(llm: LLM) -> None:
    """(g): 200 requests whose max_tokens is the whole context are all admitted at once: each holds the blocks
    of its prompt, not of the context (reserving 1,024 tokens each, 4 of them would fit)."""
    cfg = llm.config
    bpt = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    eng = Engine(llm.model, cfg, EngineConfig(max_num_seqs=200, max_model_len=1024, kv_block_size=16,
                                              kv_budget_bytes=4200 * 16 * bpt // 16))
    req = llm.prepare("<|user|>\nHi<|end|>\n<|assistant|>\n", [], SamplingParams(max_tokens=1024, ignore_eos=True))
    assert eng.cache.n_blocks * 16 < 5 * 1024
    rids = [eng.add_request(req.prompt_ids, [], req.params) for _ in range(200)]
    first = eng.step()
    assert eng.num_running == 200 and eng.num_waiting == 0 and len(first) == 200
    for _ in range(3):
        assert len(eng.step()) == 200
    for r in rids:
        eng.abort(r)
    assert eng.sched.all_free


def test_a_prefill_that_fails_alone_fails_only_its_request(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request prefilled alone in its step (no batch to retry one by one) whose forward raises: it finishes with
    an error, the request already decoding goes on to the reference's tokens, and nothing escapes step()."""
    eng = llm.engine
    good = llm.prepare(TURN1, [image_path("astronaut")], greedy(8), 1)
    bad = llm.prepare(TURN1, [image_path("coffee")], greedy(8), 1)
    prefiller = eng.runner.prefiller
    real = prefiller.prefill_range

    def prefill_range(seq, *args, **kw):
        if seq.rid == "bad":
            raise RuntimeError("out of memory, say")
        return real(seq, *args, **kw)

    monkeypatch.setattr(prefiller, "prefill_range", prefill_range)
    eng.add_request(good.prompt_ids, good.images, good.params, rid="good")
    got: dict[str, list] = {"good": [], "bad": []}
    for o in eng.step():
        got[o.rid].append(o)
    eng.add_request(bad.prompt_ids, bad.images, bad.params, rid="bad")
    while eng.has_unfinished():
        for o in eng.step():
            got[o.rid].append(o)
    assert [o.finish_reason for o in got["bad"]] == ["error"] and "out of memory" in got["bad"][0].error
    assert [t for o in got["good"] for t in o.token_ids] == reference_tokens(llm, good, 8)

