"""GPU correctness of the engine: mixed batches on CUDA (different images, prompt lengths, num_crops, arrival
times, an abort, run-ahead decode and CUDA graphs on) give every request exactly the greedy tokens of the slow
reference generator (tiny checkpoint, fp32, TF32 off).

On the GPU machine: python -m pytest -m gpu tests/gpu/test_gpu_engine_check.py
"""

from __future__ import annotations

import pytest
import torch

from phi3v import LLM, SamplingParams

from engine_common import CKPT, image_path, reference_tokens

pytestmark = pytest.mark.gpu

CASES = [  # (prompt, images, num_crops, max_tokens)
    ("<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n", ["astronaut"], 1, 20),
    ("<|user|>\n<|image_2|>\nfirst\n<|image_1|>\nsecond<|end|>\n<|assistant|>\n", ["coffee", "page_L"], 1, 28),
    ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is OCR?<|end|>\n<|assistant|>\n", [], None, 36),
    ("<|user|>\n<|image_1|>\nRead the text.<|end|>\n<|assistant|>\n", ["page_L"], 4, 12),
    ("<|user|>\n<|image_1|>\nGo on.<|end|>\n<|assistant|>\n", ["astronaut"], 1, 230),  # crosses 512
    ("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", ["logo_RGBA"], 16, 16),
]


def test_mixed_batch_on_cuda_equals_the_reference_generator(report) -> None:
    llm = LLM(CKPT, device="cuda", dtype="fp32", max_num_seqs=4, max_model_len=4096)
    eng = llm.engine
    reqs = [llm.prepare(p, [image_path(i) for i in imgs], SamplingParams(max_tokens=n, ignore_eos=True), nc)
            for p, imgs, nc, n in CASES]
    with torch.inference_mode():
        refs = [reference_tokens(llm, r, r.params.max_tokens) for r in reqs]
    got: dict[str, list[int]] = {}
    rids = [eng.add_request(r.prompt_ids, r.images, r.params, rid=f"r{i}") for i, r in enumerate(reqs[:3])]
    victim = eng.add_request(reqs[0].prompt_ids, reqs[0].images, SamplingParams(max_tokens=100, ignore_eos=True),
                             rid="victim")
    step = 0
    while eng.has_unfinished() or step < 5:
        step += 1
        if step == 5:  # arrivals while the first ones decode (4 slots: some wait for a free one)
            rids += [eng.add_request(r.prompt_ids, r.images, r.params, rid=f"r{i + 3}") for i, r in enumerate(reqs[3:])]
        if step == 9:
            eng.abort(victim)
        for o in eng.step():
            got.setdefault(o.rid, []).extend(o.token_ids)
    eng.step()  # drains a run-ahead step still in flight, if any
    cases = {rid: {"equal": got.get(rid) == ref, "n": len(ref)} for rid, ref in zip(rids, refs)}
    report({"run_ahead": eng.run_ahead, "graphs": len(eng.runner.decoder.graphs), "fused": llm.model.fused,
            "cases": cases, "victim_tokens": len(got.get("victim", [])), "slots_free": eng.sched.all_free})
    assert [rid for rid, c in cases.items() if not c["equal"]] == []
    assert eng.sched.all_free
