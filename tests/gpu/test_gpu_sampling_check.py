"""GPU correctness of the sampling parameters: presence / frequency penalties, logit_bias, seeded sampling and
n > 1 choices in one mixed batch on CUDA (run-ahead decode and CUDA graphs on) give exactly the tokens of the
plain-torch formulas over a full recompute (tiny checkpoint, fp32, TF32 off).

On the GPU machine: python -m pytest -m gpu tests/gpu/test_gpu_sampling_check.py
"""

from __future__ import annotations

import pytest

from phi3v import LLM, SamplingParams

from engine_common import CKPT, slow_sampled_tokens

pytestmark = pytest.mark.gpu

MESSAGES = [{"role": "user", "content": "Tell me about cats and dogs please. " * 14}]
LIFT = {1000: 50.0, 3000: 50.0}


def test_penalties_bias_and_n_in_a_mixed_batch_on_cuda(report) -> None:
    llm = LLM(CKPT, device="cuda", dtype="fp32", max_num_seqs=8, max_model_len=4096)
    hot = dict(temperature=1.5, seed=99, max_tokens=16)
    cases = {  # name -> (SamplingParams, the slow loop's keyword arguments)
        "greedy": (SamplingParams(max_tokens=16), {}),
        "rewarded": (SamplingParams(max_tokens=12, logit_bias=LIFT, presence_penalty=-2.0, frequency_penalty=-2.0),
                     dict(bias=LIFT, presence=-2.0, frequency=-2.0)),
        "penalised": (SamplingParams(max_tokens=12, logit_bias=LIFT, presence_penalty=1.0, frequency_penalty=0.5),
                      dict(bias=LIFT, presence=1.0, frequency=0.5)),
        "sampled": (SamplingParams(frequency_penalty=1.5, logit_bias={1000: 8.0, 2000: 8.0}, **hot),
                    dict(temperature=1.5, seed=99, frequency=1.5, bias={1000: 8.0, 2000: 8.0})),
    }
    n3 = SamplingParams(n=3, **hot)
    reqs = [llm.prepare_chat(MESSAGES, p) for p, _ in cases.values()] + [llm.prepare_chat(MESSAGES, n3)]
    outs = llm.generate_many(reqs)
    ids = reqs[0].prompt_ids
    res = {}
    for (name, (p, kw)), out in zip(cases.items(), outs):
        res[name] = out.token_ids == slow_sampled_tokens(llm, ids, p.max_tokens, **kw)
    for i, c in enumerate(outs[-1]):
        want = slow_sampled_tokens(llm, ids, 16, temperature=1.5, seed=n3.for_choice(i).seed)
        res[f"choice{i}"] = c.token_ids == want
    distinct = len({tuple(c.token_ids) for c in outs[-1]})
    eng = llm.engine
    report({"equal": res, "distinct_choices": distinct, "run_ahead": eng.run_ahead,
            "graphs": len(eng.runner.decoder.graphs),
            "sibling_cached": [c.usage["prompt_tokens_details"]["cached_tokens"] for c in outs[-1]]})
    assert all(res.values()) and distinct == 3
