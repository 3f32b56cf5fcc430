"""Presence / frequency penalties, logit_bias and n > 1 through the engine (phi3v.LLM), token for token against a
slow loop that recomputes the whole sequence and applies the OpenAI formulas with plain torch."""

from __future__ import annotations

import pytest
import torch

from phi3v.api import LLM
from phi3v.sampling_params import SamplingParams

from engine_common import slow_sampled_tokens as _slow

MESSAGES = [{"role": "user", "content": "Tell me about cats and dogs please"}]


def _ids(llm: LLM) -> list[int]:
    return llm.prepare_chat(MESSAGES, SamplingParams()).prompt_ids


def test_presence_and_frequency_penalties_token_for_token(llm: LLM, kv_memory_is_free) -> None:
    """The tiny model never repeats a token on its own, so two tokens are lifted far above the rest: greedy then
    alternates between them by the model's logits; a reward for the tokens already generated (negative penalties)
    makes it repeat one: the counts of the generated tokens change the picks, exactly as the formula says."""
    lift = {1000: 50.0, 3000: 50.0}
    ids = _ids(llm)
    plain = llm.chat(MESSAGES, SamplingParams(max_tokens=9, logit_bias=lift)).token_ids
    assert plain == _slow(llm, ids, 9, bias=lift) and set(plain) <= set(lift)
    cases = [dict(frequency_penalty=-2.0), dict(presence_penalty=-2.0),
             dict(presence_penalty=-2.0, frequency_penalty=-2.0),
             dict(presence_penalty=1.0, frequency_penalty=0.5)]
    got = {}
    for kw in cases:
        out = llm.chat(MESSAGES, SamplingParams(max_tokens=9, logit_bias=lift, **kw)).token_ids
        want = _slow(llm, ids, 9, bias=lift, presence=kw.get("presence_penalty", 0.0),
                     frequency=kw.get("frequency_penalty", 0.0))
        assert out == want, kw
        assert set(out) <= set(lift), kw
        got[tuple(kw.items())] = out
    assert got[(("presence_penalty", -2.0), ("frequency_penalty", -2.0))] != plain  # the reward changed the picks
    # sampled, with the sampler's seeded noise
    hot = dict(temperature=1.5, seed=1234, max_tokens=12, frequency_penalty=1.5, logit_bias={1000: 8.0, 2000: 8.0})
    sampled = llm.chat(MESSAGES, SamplingParams(**hot)).token_ids
    assert sampled == _slow(llm, ids, 12, temperature=1.5, seed=1234, frequency=1.5, bias={1000: 8.0, 2000: 8.0})
    # per row: batched next to unpenalised and differently penalised requests, the same tokens
    batched = llm.generate_many([llm.prepare_chat(MESSAGES, SamplingParams(max_tokens=9, logit_bias=lift)),
                                 llm.prepare_chat(MESSAGES, SamplingParams(**hot)),
                                 llm.prepare_chat(MESSAGES, SamplingParams(max_tokens=9, logit_bias=lift, **cases[2])),
                                 llm.prepare_chat(MESSAGES, SamplingParams(max_tokens=9))])
    assert batched[0].token_ids == plain and batched[1].token_ids == sampled
    assert batched[2].token_ids == got[tuple(cases[2].items())]
    assert batched[3].token_ids == _slow(llm, ids, 9)


def test_logit_bias_forces_and_forbids_tokens(llm: LLM, kv_memory_is_free) -> None:
    forced = llm.chat(MESSAGES, SamplingParams(max_tokens=5, logit_bias={1000: 100.0}))
    assert forced.token_ids == [1000] * 5
    greedy = llm.chat(MESSAGES, SamplingParams(max_tokens=6)).token_ids
    ban = {greedy[0]: -100.0, 42: 3.0}
    got = llm.chat(MESSAGES, SamplingParams(max_tokens=6, logit_bias=ban)).token_ids
    assert got[0] != greedy[0] and greedy[0] not in got
    assert got == _slow(llm, _ids(llm), 6, bias=ban)
    with pytest.raises(ValueError, match="logit_bias names token"):
        llm.chat(MESSAGES, SamplingParams(max_tokens=2, logit_bias={llm.config.vocab_size: 1.0}))


def test_default_greedy_is_unchanged(llm: LLM, kv_memory_is_free) -> None:
    assert llm.chat(MESSAGES, SamplingParams(max_tokens=12)).token_ids == _slow(llm, _ids(llm), 12)


def test_n_choices_share_the_prompt_and_draw_distinct_samples(llm: LLM, kv_memory_is_free) -> None:
    long_chat = [{"role": "user", "content": "Describe the history of the city in great detail. " * 12}]
    kw = dict(temperature=1.5, seed=7, max_tokens=10)
    outs = llm.chat(long_chat, SamplingParams(n=3, **kw))
    assert [c.index for c in outs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs}) == 3  # distinct draws per index
    assert outs[0].token_ids == llm.chat(long_chat, SamplingParams(**kw)).token_ids  # choice 0 keeps the seed
    again = llm.chat(long_chat, SamplingParams(n=3, **kw))
    assert [c.token_ids for c in again] == [c.token_ids for c in outs]  # reproducible
    llm.engine.reset_prefix_cache()
    fresh = llm.chat(long_chat, SamplingParams(n=3, **kw))
    block = llm.engine.options.kv_block_size
    assert fresh[0].usage["prompt_tokens_details"]["cached_tokens"] == 0
    for c in fresh[1:]:  # the siblings joined after choice 0's prefill: its full blocks were cached for them
        full_blocks = (c.usage["prompt_tokens"] - 1) // block * block  # the last prompt token is always computed
        assert c.usage["prompt_tokens_details"]["cached_tokens"] == full_blocks > 0
    greedy = llm.chat(long_chat, SamplingParams(n=2, max_tokens=6))
    assert greedy[0].token_ids == greedy[1].token_ids == llm.chat(long_chat, SamplingParams(max_tokens=6)).token_ids
    many = llm.generate_many([llm.prepare_chat(long_chat, SamplingParams(n=2, **kw)),
                              llm.prepare_chat(MESSAGES, SamplingParams(max_tokens=3))])
    assert [c.token_ids for c in many[0]] == [c.token_ids for c in outs[:2]] and many[1].usage["completion_tokens"] == 3
    with pytest.raises(ValueError, match="n=1"):
        list(llm.stream(MESSAGES, sampling_params=SamplingParams(n=2)))
