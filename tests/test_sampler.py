"""The batched sampler: parameters, greedy, seeds, top-k/top-p, penalty, logprobs."""

import math

import pytest
import torch

from phi3v.sampling_params import SamplingParams
from phi3v.engine.sampler import (SamplingTensors, apply_logit_bias, apply_presence_frequency, apply_repetition_penalty,
                                  sample, top_logprobs,
                                  uniform_noise)


@pytest.mark.parametrize("kw", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(top_k=-2), dict(repetition_penalty=0), dict(stop=[""]), dict(logprobs=99),
                                dict(seed="x"), dict(max_tokens=True), dict(seed=2**64), dict(top_k=2**40)])
def test_bad_parameters_raise_value_error(kw):
    with pytest.raises(ValueError, match="invalid sampling parameter"):
        SamplingParams(**kw)


def _t(params, seeds=None):
    return SamplingTensors.build(params, seeds or list(range(len(params))), "cpu")


def test_greedy_rows_take_argmax_even_next_to_sampled_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=0.7)]
    tok = sample(logits, _t(params), torch.zeros(4, dtype=torch.long))
    assert tok[0] == logits[0].argmax() and tok[2] == logits[2].argmax()


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 500)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = sample(logits[1:2], _t([p], [42]), torch.tensor([5]))
    batched = sample(logits, _t([SamplingParams(temperature=1.0)] * 3, [7, 42, 9]), torch.tensor([0, 5, 3]))
    assert alone[0] == batched[1]
    other_step = [int(sample(logits[1:2], _t([p], [42]), torch.tensor([s]))[0]) for s in range(20)]
    assert len(set(other_step)) > 3  # the step counter changes the draw


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 1e-9]]))
    p = SamplingParams(temperature=1.0)
    counts = torch.zeros(4)
    n = 4000
    for s in range(n):
        counts[sample(logits, _t([p], [s]), torch.tensor([0]))[0]] += 1
    freq = counts / n
    assert abs(freq[0] - 0.6) < 0.03 and abs(freq[1] - 0.3) < 0.03 and abs(freq[2] - 0.1) < 0.02 and freq[3] == 0


def test_uniform_noise_range_and_spread():
    u = uniform_noise(torch.tensor([0, 1 << 40]), torch.tensor([0, 3]), 10000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.02 and not torch.equal(u[0], u[1])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    seen_k, seen_p = set(), set()
    for s in range(300):
        seen_k.add(int(sample(logits, _t([SamplingParams(temperature=1.0, top_k=2)], [s]), torch.tensor([0]))[0]))
        seen_p.add(int(sample(logits, _t([SamplingParams(temperature=1.0, top_p=0.7)], [s]), torch.tensor([0]))[0]))
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}  # 0.5 < 0.7, 0.5+0.25 >= 0.7: the nucleus is {0, 1}


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    tok = sample(logits, _t([SamplingParams(repetition_penalty=3.0)]), torch.zeros(1, dtype=torch.long), seen)
    assert int(tok[0]) == 2


def test_top_logprobs_pack():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    packed = top_logprobs(logits, torch.tensor([2]), 2)
    lp = torch.log_softmax(logits, -1)[0]
    assert packed.shape == (1, 3, 2)
    assert packed[0, 0].tolist() == pytest.approx([float(lp[2]), 2.0])
    assert packed[0, 1].tolist() == pytest.approx([float(lp[1]), 1.0])
    assert math.isclose(float(packed[0, 2, 0]), float(lp[2]), rel_tol=1e-6)


@pytest.mark.parametrize("kw", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(presence_penalty="1"),
                                dict(logit_bias={5: 101}), dict(logit_bias={-1: 1.0}), dict(logit_bias={"5": 1.0}),
                                dict(logit_bias=[1, 2]), dict(n=0), dict(n=129), dict(n=True)])
def test_bad_penalty_bias_and_n_raise_value_error(kw):
    with pytest.raises(ValueError, match="invalid sampling parameter"):
        SamplingParams(**kw)


def test_presence_and_frequency_penalties_follow_openai_formula():
    """logit - presence * (count > 0) - frequency * count, per row, against a plain torch computation; rows
    without penalties untouched."""
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    counts = torch.zeros(3, 50)
    counts[0, [1, 4, 4, 4]] = torch.tensor([1.0, 3.0, 3.0, 3.0])  # token 1 once, token 4 three times
    counts[1, 7] = 2.0
    counts[2, 9] = 5.0
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5), SamplingParams()]
    t = _t(params)
    out = apply_presence_frequency(logits, counts, t.presence, t.frequency)
    want = logits.clone()
    for b, (pres, freq) in enumerate([(0.5, 0.25), (-1.0, 1.5), (0.0, 0.0)]):
        for j in range(50):
            c = float(counts[b, j])
            want[b, j] = logits[b, j] - pres * (1.0 if c > 0 else 0.0) - freq * c
    torch.testing.assert_close(out, want)
    assert torch.equal(out[2], logits[2])
    # through sample(): a greedy row whose argmax is penalised away picks the next best
    top = int(logits[0].argmax())
    counts2 = torch.zeros(1, 50)
    counts2[0, top] = 10.0  # 10 x 2.0 below its logit: under any other of randn's
    p = SamplingParams(frequency_penalty=2.0)
    tok = sample(logits[:1], _t([p]), torch.zeros(1, dtype=torch.long), counts=counts2)
    assert int(tok[0]) == int(logits[0].topk(2).indices[1])


def test_logit_bias_is_added_per_row_and_forces_a_token():
    torch.manual_seed(4)
    logits = torch.randn(3, 40)
    params = [SamplingParams(logit_bias={7: 100.0, 3: -2.5}), SamplingParams(), SamplingParams(logit_bias={0: -100.0})]
    t = _t(params)
    out = apply_logit_bias(logits, t.bias)
    want = logits.clone()
    want[0, 7] += 100.0
    want[0, 3] -= 2.5
    want[2, 0] -= 100.0
    torch.testing.assert_close(out, want)
    tok = sample(logits, t, torch.zeros(3, dtype=torch.long))
    assert int(tok[0]) == 7 and int(tok[1]) == int(logits[1].argmax())
    # sampled rows too: +100 leaves no mass elsewhere
    hot = [SamplingParams(temperature=1.0, logit_bias={11: 100.0})]
    assert {int(sample(logits[:1], _t(hot, [s]), torch.zeros(1, dtype=torch.long))[0]) for s in range(50)} == {11}


def test_defaults_leave_logits_alone():
    """Default parameters: no bias, no count tensors, a plain argmax (greedy outputs unchanged)."""
    p = SamplingParams()
    t = _t([p])
    assert p.plain_argmax and t.bias is None and not t.any_counts
    assert not SamplingParams(logit_bias={1: 0.5}).plain_argmax
    assert not SamplingParams(frequency_penalty=0.1).plain_argmax


def test_choice_seeds_are_distinct_and_keep_choice_zero():
    p = SamplingParams(temperature=1.0, seed=42, n=3)
    seeds = [p.for_choice(i).seed for i in range(3)]
    assert seeds[0] == 42 and len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert all(p.for_choice(i).n == 1 for i in range(3)) and p.for_choice(1).seed == seeds[1]
    assert SamplingParams(n=2).for_choice(1).seed is None
