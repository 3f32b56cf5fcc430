"""End to end through the public API on the tiny checkpoint: golden greedy tokens and logprobs,
the cached engine against the slow reference generator, mixed batches, abort, stop strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phi3v import LLM, SamplingParams
from phi3v.engine.engine import ImageInput

from engine_common import ENGINE_CASES, GOLD, MANIFEST, PROMPTS, image_path, reference_tokens

pytestmark = pytest.mark.usefixtures("kv_memory_is_free")  # after every test: the shared engine is empty



@pytest.mark.parametrize("key", ENGINE_CASES)
def test_golden_greedy_tokens_and_logprobs(llm: LLM, key: str) -> None:
    case = MANIFEST["model"][key]
    z = np.load(GOLD / case["file"])
    images = [image_path(n) for n in case.get("images") or []]
    params = SamplingParams(max_tokens=32, ignore_eos=True, logprobs=8)
    c = llm.generate(case["prompt"], images=images, sampling_params=params, num_crops=case.get("num_crops"))
    req = llm.prepare(case["prompt"], images, params, case.get("num_crops"))
    assert req.prompt_ids == z["input_ids"].tolist()
    assert c.usage["prompt_tokens"] == len(z["input_ids"]) and c.usage["completion_tokens"] == 32
    assert c.token_ids == z["gen_ids"].tolist(), f"{key}: greedy continuation differs from the reference"
    assert c.finish_reason == "length"
    # logprobs = log-softmax of the raw logits: check against the reference's full logits
    steps = {0: z["last_logits"]}
    for s, full in zip(z["gen_full_logits_steps"].tolist(), z["gen_full_logits"]):
        steps[s] = full
    for s, full in steps.items():
        ref = torch.log_softmax(torch.from_numpy(full).double(), -1)
        got = c.logprobs[s]
        assert got["token_id"] == int(z["gen_ids"][s])
        assert abs(got["logprob"] - float(ref[got["token_id"]])) <= 1e-3
        for item in got["top_logprobs"]:
            assert abs(item["logprob"] - float(ref[item["token_id"]])) <= 1e-3
        if z["gen_top2_gap"][s] > 1e-3:
            assert got["top_logprobs"][0]["token_id"] == int(z["gen_top_ids"][s][0])




@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_cached_engine_equals_reference_generator(llm: LLM, i: int) -> None:
    prompt, names, nc = PROMPTS[i]
    req = llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=24, ignore_eos=True), nc)
    fast = llm.generate_many([req])[0].token_ids
    assert fast == reference_tokens(llm, req, 24)


def test_crossing_original_max_recomputes_with_long_factors(llm: LLM) -> None:
    # tiny config: original_max 512. A 313-token image prompt + 250 tokens crosses it mid-decode.
    req = llm.prepare("<|user|>\n<|image_1|>\nGo on.<|end|>\n<|assistant|>\n", [image_path("astronaut")],
                      SamplingParams(max_tokens=250, ignore_eos=True), 1)
    assert len(req.prompt_ids) < 512 < len(req.prompt_ids) + 250
    assert llm.generate_many([req])[0].token_ids == reference_tokens(llm, req, 250)


def test_mixed_batch_with_arrivals_equals_each_alone(llm: LLM) -> None:
    reqs = []
    for j, (prompt, names, nc) in enumerate(PROMPTS):
        reqs.append(llm.prepare(prompt, [image_path(n) for n in names],
                                SamplingParams(max_tokens=8 + 5 * j, ignore_eos=True), nc))
    alone = [llm.generate_many([r])[0].token_ids for r in reqs]
    eng = llm.engine
    got: dict[str, list[int]] = {}
    rids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs[:2]]
    for _ in range(3):  # the first two are decoding when the rest arrive
        for o in eng.step():
            got.setdefault(o.rid, []).extend(o.token_ids)
    rids += [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs[2:]]
    for rid, ids in eng.run_to_completion().items():
        got.setdefault(rid, []).extend(ids)
    assert [got[r] for r in rids] == alone
    assert eng.num_running == 0 and eng.num_waiting == 0 and eng.sched.all_free


def test_image_embedding_cache_encodes_an_image_once(llm: LLM) -> None:
    p = SamplingParams(max_tokens=2)
    before = dict(llm.engine.stats)
    prompt = "<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"
    a = llm.generate(prompt, [image_path("coffee")], p, num_crops=4)
    llm.engine.reset_prefix_cache()  # else the prefix cache covers the image: no features needed at all
    b = llm.generate(prompt, [image_path("coffee")], p, num_crops=4)
    assert a.token_ids == b.token_ids
    assert llm.engine.stats["images_encoded"] - before["images_encoded"] <= 1
    assert llm.engine.stats["image_cache_hits"] - before["image_cache_hits"] >= 1


def test_abort_frees_the_slot(llm: LLM) -> None:
    eng = llm.engine
    req = llm.prepare("<|user|>\nHi<|end|>\n<|assistant|>\n", [], SamplingParams(max_tokens=50, ignore_eos=True))
    rid = eng.add_request(req.prompt_ids, req.images, req.params)
    eng.step()
    eng.step()
    assert eng.num_running == 1
    assert eng.abort(rid) and not eng.abort(rid)
    assert eng.num_running == 0 and not eng.has_unfinished()


def test_stream_deltas_join_to_the_text_and_stop_strings_cut(llm: LLM) -> None:
    msgs = [{"role": "user", "content": [{"type": "image", "image": image_path("astronaut")},
                                         {"type": "text", "text": "Describe."}]}]
    full = llm.chat(msgs, SamplingParams(max_tokens=40, ignore_eos=True), num_crops=1)
    deltas = list(llm.stream(msgs, sampling_params=SamplingParams(max_tokens=40, ignore_eos=True), num_crops=1))
    assert "".join(deltas) == full.text and len(deltas) > 1
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip()
    cut = llm.chat(msgs, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]), num_crops=1)
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(llm.stream(msgs, sampling_params=SamplingParams(max_tokens=40, ignore_eos=True, stop=stop),
                                  num_crops=1))
    assert streamed == cut.text and stop not in streamed


def test_seeded_sampling_reproducible_and_batch_independent(llm: LLM) -> None:
    prompt = "<|user|>\n<|image_1|>\nTell me.<|end|>\n<|assistant|>\n"
    p = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a = llm.generate(prompt, [image_path("astronaut")], p, num_crops=1)
    b = llm.generate(prompt, [image_path("astronaut")], p, num_crops=1)
    assert a.token_ids == b.token_ids
    other = llm.prepare("<|user|>\nNoise<|end|>\n<|assistant|>\n", [], SamplingParams(max_tokens=20, temperature=1.0))
    mine = llm.prepare(prompt, [image_path("astronaut")], p, 1)
    assert llm.generate_many([other, mine])[1].token_ids == a.token_ids
    c = llm.generate(prompt, [image_path("astronaut")], SamplingParams(**{**p.__dict__, "seed": 124}), num_crops=1)
    assert c.token_ids != a.token_ids


@torch.inference_mode()
def _slow_penalised_greedy(llm: LLM, ids: list[int], penalty: float, n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        seq = ids + out
        x = llm.model.model.embed_tokens(torch.tensor(seq))[None]
        h = llm.model(x, torch.arange(len(seq))[None], torch.tensor([False]), None)
        logits = llm.model.logits(h[:, -1])[0]
        seen = torch.tensor(sorted(set(seq)))
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)  # HF semantics
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("penalty", [0.3, 4.0])
def test_repetition_penalty_matches_a_slow_implementation(llm: LLM, penalty: float) -> None:
    prompt = "<|user|>\nrepeat repeat repeat<|end|>\n<|assistant|>\n"
    plain = llm.generate(prompt, [], SamplingParams(max_tokens=16, ignore_eos=True))
    pen = llm.generate(prompt, [], SamplingParams(max_tokens=16, ignore_eos=True, repetition_penalty=penalty))
    ids = llm.prepare(prompt, []).prompt_ids
    assert pen.token_ids == _slow_penalised_greedy(llm, ids, penalty, 16)
    if penalty < 1:  # a penalty below 1 favours seen tokens: the output must change
        assert pen.token_ids != plain.token_ids


def test_engine_rejects_placeholders_without_images(llm: LLM) -> None:
    with pytest.raises(ValueError, match="image 1"):
        llm.engine.add_request([1, -1, -1, 5], [], SamplingParams())
    crops = torch.zeros(2, 3, 336, 336)
    with pytest.raises(ValueError, match="vocab"):
        llm.engine.add_request([1, 10**6], [ImageInput(crops, (336, 336))], SamplingParams())


def test_run_ahead_gives_the_same_tokens_with_finishes_aborts_and_arrivals(llm: LLM) -> None:
    """Decode step t+1 launched before step t is read on the host (the CUDA schedule), forced on
    here: same tokens as the synchronous schedule, wasted tokens of finished/aborted rows dropped."""
    reqs = [llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=6 + 4 * j, ignore_eos=True), nc)
            for j, (prompt, names, nc) in enumerate(PROMPTS)]
    sampled = llm.prepare(PROMPTS[3][0], [], SamplingParams(max_tokens=15, temperature=0.9, seed=5, logprobs=2))
    penalised = llm.prepare(PROMPTS[0][0], [image_path("astronaut")], SamplingParams(max_tokens=9, repetition_penalty=0.5,
                                                                                     ignore_eos=True), 1)
    reqs += [sampled, penalised]

    def drive(run_ahead: bool) -> tuple[dict[str, list[int]], dict[str, list]]:
        eng = llm.engine
        eng.run_ahead = run_ahead
        got: dict[str, list[int]] = {}
        lps: dict[str, list] = {}
        rids = [eng.add_request(r.prompt_ids, r.images, r.params, rid=f"{run_ahead}-{i}") for i, r in enumerate(reqs[:3])]
        victim = eng.add_request(reqs[0].prompt_ids, reqs[0].images, SamplingParams(max_tokens=40, ignore_eos=True),
                                 rid=f"{run_ahead}-victim")
        n = 0
        while eng.has_unfinished() or n < 4:
            n += 1
            if n == 4:  # arrivals while others decode
                rids += [eng.add_request(r.prompt_ids, r.images, r.params, rid=f"{run_ahead}-{i + 3}")
                         for i, r in enumerate(reqs[3:])]
            if n == 6:
                eng.abort(victim)
            for o in eng.step():
                got.setdefault(o.rid.split("-", 1)[1], []).extend(o.token_ids)
                lps.setdefault(o.rid.split("-", 1)[1], []).extend(o.logprobs)
        eng.step()  # drains a step still in flight, if any
        assert eng.num_running == 0 and eng._ahead is None
        return got, lps

    try:
        sync, sync_lp = drive(False)
        ahead, ahead_lp = drive(True)
    finally:
        llm.engine.run_ahead = False
    assert ahead == sync
    # logprobs: equal up to float noise (a run-ahead step can batch a finished row's wasted token)
    for k, steps in sync_lp.items():
        for (t1, v1, top1), (t2, v2, top2) in zip(steps, ahead_lp[k]):
            assert t1 == t2 and abs(v1 - v2) < 1e-5 and [a for a, _ in top1] == [a for a, _ in top2]
    assert len(sync["victim"]) < 40 and len(sync["5"]) == 15 and len(sync["6"]) == 9
    assert [len(sync[str(i)]) for i in range(5)] == [6 + 4 * j for j in range(5)]


def test_generate_many_prepares_callables_on_threads_in_order(llm: LLM) -> None:
    import functools

    specs = [(p, [image_path(n) for n in names], SamplingParams(max_tokens=5, ignore_eos=True), nc)
             for p, names, nc in PROMPTS]
    eager = llm.generate_many([llm.prepare(*s) for s in specs])
    lazy = llm.generate_many([functools.partial(llm.prepare, *s) for s in specs])
    assert [c.token_ids for c in lazy] == [c.token_ids for c in eager]
    with pytest.raises(ValueError, match="image_2"):
        llm.generate_many([functools.partial(llm.prepare, PROMPTS[1][0], [image_path("coffee")])])
    assert llm.engine.num_running == 0 and not llm.engine.has_unfinished()


def test_small_image_cache_keeps_every_image_a_step_needs(llm: LLM) -> None:
    eng = llm.engine
    size = eng.runner.images.size
    prompt = "<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"
    reqs = [llm.prepare(prompt, [image_path(n)], SamplingParams(max_tokens=3), 1) for n in ("coffee", "page_L", "logo_RGBA")]
    try:
        eng.runner.images.size = 1
        first = llm.generate_many(reqs[:1])[0].token_ids  # "coffee" is now cached: a hit in the next step
        eng.reset_prefix_cache()  # (which the prefix cache would otherwise serve without any features)
        got = [c.token_ids for c in llm.generate_many(reqs)]  # one step needs the hit and two new images
    finally:
        eng.runner.images.size = size
    assert got[0] == first and len(eng.runner.images.cache) >= 3


def test_paged_kv_admits_by_free_blocks_and_matches_each_alone(llm: LLM) -> None:
    """A second engine on the same model with room for about half of these requests' KV, in blocks of 16:
    requests wait for blocks (FIFO), reuse freed blocks in scrambled order, and give the same tokens."""
    from phi3v.engine.config import EngineConfig
    from phi3v.engine.engine import Engine

    reqs = [llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=6 + 3 * j, ignore_eos=True), nc)
            for j, (prompt, names, nc) in enumerate(PROMPTS)]
    alone = [llm.generate_many([r])[0].token_ids for r in reqs]
    cfg = llm.config
    bpt = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32
    longest = max(len(r.prompt_ids) + r.params.max_tokens for r in reqs)
    eng = Engine(llm.model, cfg, EngineConfig(max_num_seqs=6, max_model_len=longest + 8, kv_block_size=16,
                 kv_budget_bytes=int(1.8 * longest) * bpt))
    assert eng.cache.n_blocks * 16 < sum(len(r.prompt_ids) + r.params.max_tokens for r in reqs) / 1.5
    rids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs]
    most = 0
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        most = max(most, eng.num_running)
        assert eng.sched.kv_usage <= 1.0
        for o in eng.step():
            got.setdefault(o.rid, []).extend(o.token_ids)
    eng.step()
    assert [got[r] for r in rids] == alone
    assert 1 <= most < len(reqs)  # memory, not max_num_seqs, bounded the batch
    assert eng.sched.all_free


def test_run_prepares_a_bounded_window_ahead_and_reports_soft_failures(llm: LLM) -> None:
    """40 callables: preparation stays a bounded distance ahead of the engine (max_num_seqs waiting +
    a prefetch window), results come back complete and in order, and a callable that returns an
    exception is reported in place of its completion while the others go on."""
    called: list[int] = []
    prompt = "<|user|>\nSay something.<|end|>\n<|assistant|>\n"

    def make(i: int):
        def prep():
            called.append(i)
            if i == 7:
                return ValueError("bad request 7")
            return llm.prepare(prompt, [], SamplingParams(max_tokens=2 + i % 3, ignore_eos=True))
        return prep

    seen_at_first, results = None, {}
    for i, _delta, done in llm.run([make(i) for i in range(40)], workers=2):
        if done is not None:
            if seen_at_first is None:
                seen_at_first = len(called)
            results[i] = done
    cap = llm.engine.sched.max_num_seqs
    assert seen_at_first is not None and seen_at_first <= 2 * cap + max(16, 2 * cap) + 2
    assert sorted(results) == list(range(40))
    assert isinstance(results[7], ValueError)
    assert all(len(results[i].token_ids) == 2 + i % 3 for i in range(40) if i != 7)


