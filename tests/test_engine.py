"""End to end through the public API on the tiny checkpoint: golden greedy tokens and logprobs,
the cached engine against the slow reference generator, mixed batches, abort, stop strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phi3v import LLM, SamplingParams
from phi3v.engine.engine import ImageInput
from phi3v.engine.reference import reference_generate

DATA = Path(__file__).parent / "data"
GOLD = DATA / "golden"
CKPT = str(DATA / "tiny-phi3v")
MANIFEST = json.loads((GOLD / "manifest.json").read_text())


def image_path(name: str) -> str:
    return str(next(p for p in (GOLD / "images").iterdir() if p.stem == name))


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(CKPT, device="cpu", dtype="fp32", max_num_seqs=6, max_model_len=4096)


@pytest.fixture(autouse=True)
def kv_memory_is_free_after_each_test(llm: LLM):
    yield
    eng = llm.engine
    eng.step()  # drains a run-ahead step still in flight, if any
    assert not eng.has_unfinished() and eng._ahead is None
    assert eng.sched.all_free and not eng.sched.seqs


# Crossing cases follow Microsoft's later fix (the Phi-3.5 code); all others are identical in both.
CASES = [k for k, v in MANIFEST["model"].items()
         if v.get("status") == "ok" and v.get("file") and (k.endswith("phi35v") or
                                                          k.replace("/phi3v", "/phi35v") not in MANIFEST["model"])]


@pytest.mark.parametrize("key", CASES)
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


def _reference(llm: LLM, req, max_tokens: int) -> list[int]:
    feats = llm.model.encode_images([i.crops for i in req.images], [i.image_size for i in req.images])
    return reference_generate(llm.model, req.prompt_ids, feats, max_tokens, frozenset(llm.config.eos_token_ids),
                              llm.config.original_max_position_embeddings)


PROMPTS = [
    ("<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n", ["astronaut"], 1),
    ("<|user|>\n<|image_2|>\nfirst\n<|image_1|>\nsecond<|end|>\n<|assistant|>\n", ["coffee", "page_L"], 1),
    ("<|user|>\n<|image_1|>\nagain <|image_1|>\n<|end|>\n<|assistant|>\n", ["logo_RGBA"], 1),
    ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is OCR?<|end|>\n<|assistant|>\n", [], None),
    ("<|user|>\n<|image_1|>\nRead the text.<|end|>\n<|assistant|>\n", ["page_L"], 4),
]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_cached_engine_equals_reference_generator(llm: LLM, i: int) -> None:
    prompt, names, nc = PROMPTS[i]
    req = llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=24, ignore_eos=True), nc)
    fast = llm.generate_many([req])[0].token_ids
    assert fast == _reference(llm, req, 24)


def test_crossing_original_max_recomputes_with_long_factors(llm: LLM) -> None:
    # tiny config: original_max 512. A 313-token image prompt + 250 tokens crosses it mid-decode.
    req = llm.prepare("<|user|>\n<|image_1|>\nGo on.<|end|>\n<|assistant|>\n", [image_path("astronaut")],
                      SamplingParams(max_tokens=250, ignore_eos=True), 1)
    assert len(req.prompt_ids) < 512 < len(req.prompt_ids) + 250
    assert llm.generate_many([req])[0].token_ids == _reference(llm, req, 250)


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


def test_batched_prefill_of_similar_prompts_equals_each_alone(llm: LLM) -> None:
    # four prompts of similar length (one 1-crop image each, different texts/images) prefill in one
    # padded forward; a long one goes alone
    specs = [("<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n", "astronaut"),
             ("<|user|>\n<|image_1|>\nWhat is written here, exactly?<|end|>\n<|assistant|>\n", "page_L"),
             ("<|user|>\n<|image_1|>\nColours?<|end|>\n<|assistant|>\n", "logo_RGBA"),
             ("<|user|>\n<|image_1|>\nIs this a cup of coffee or tea? Say why.<|end|>\n<|assistant|>\n", "coffee")]
    reqs = [llm.prepare(p, [image_path(n)], SamplingParams(max_tokens=10, ignore_eos=True), 1) for p, n in specs]
    reqs.append(llm.prepare(PROMPTS[1][0], [image_path("coffee"), image_path("page_L")],
                            SamplingParams(max_tokens=10, ignore_eos=True), 4))
    alone = [llm.generate_many([r])[0].token_ids for r in reqs]
    before = llm.engine.stats["batched_prefills"]
    together = [c.token_ids for c in llm.generate_many(reqs)]
    assert llm.engine.stats["batched_prefills"] == before + 1
    assert together == alone
    refs = [_reference(llm, r, 10) for r in reqs]
    assert together == refs


def test_small_image_cache_keeps_every_image_a_step_needs(llm: LLM) -> None:
    eng = llm.engine
    size = eng.images.size
    prompt = "<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"
    reqs = [llm.prepare(prompt, [image_path(n)], SamplingParams(max_tokens=3), 1) for n in ("coffee", "page_L", "logo_RGBA")]
    try:
        eng.images.size = 1
        first = llm.generate_many(reqs[:1])[0].token_ids  # "coffee" is now cached: a hit in the next step
        got = [c.token_ids for c in llm.generate_many(reqs)]  # one step needs the hit and two new images
    finally:
        eng.images.size = size
    assert got[0] == first and len(eng.images.cache) >= 3


def test_paged_kv_admits_by_free_blocks_and_matches_each_alone(llm: LLM) -> None:
    """A second engine on the same model with room for about half of these requests' KV, in blocks of 16:
    requests wait for blocks (FIFO), reuse freed blocks in scrambled order, and give the same tokens."""
    from phi3v.engine.engine import Engine

    reqs = [llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=6 + 3 * j, ignore_eos=True), nc)
            for j, (prompt, names, nc) in enumerate(PROMPTS)]
    alone = [llm.generate_many([r])[0].token_ids for r in reqs]
    cfg = llm.config
    bpt = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32
    longest = max(len(r.prompt_ids) + r.params.max_tokens for r in reqs)
    eng = Engine(llm.model, cfg, max_num_seqs=6, max_model_len=longest + 8, block_size=16,
                 kv_budget_bytes=int(1.8 * longest) * bpt)
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


def test_padded_prefill_of_the_graph_path_equals_unpadded(llm: LLM) -> None:
    """Short prompts are prefilled padded to a length bucket (a CUDA graph on the GPU; here the same
    padded forward, eagerly): padding writes only the scratch block and the tokens do not change."""
    reqs = [llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=8, ignore_eos=True), nc)
            for prompt, names, nc in PROMPTS]
    plain = [llm.generate_many([r])[0].token_ids for r in reqs]
    eng = llm.engine
    runner = eng.prefill_runner
    scratch = eng.cache.k[:, eng.cache.scratch].clone()
    try:
        runner.pad_eager = True
        padded = [llm.generate_many([r])[0].token_ids for r in reqs]
    finally:
        runner.pad_eager = False
    assert padded == plain
    assert sorted(runner.graphs) == sorted({next(b for b in (128, 256, 384, 512, 640, 768, 896, 1024)
                                                 if b >= len(r.prompt_ids)) for r in reqs})
    assert not torch.equal(eng.cache.k[:, eng.cache.scratch], scratch)  # the padding went there


def test_chunked_prefill_across_blocks_equals_one_pass(llm: LLM) -> None:
    """Prompts prefilled in 100-token chunks (each chunk attends over the earlier ones read back from
    16-token blocks) give the same tokens as one-pass prefill."""
    from phi3v.engine.engine import Engine

    reqs = [llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=6, ignore_eos=True), nc)
            for prompt, names, nc in PROMPTS]
    alone = [llm.generate_many([r])[0].token_ids for r in reqs]
    eng = Engine(llm.model, llm.config, max_num_seqs=1, max_model_len=1024, block_size=16, prefill_chunk=100)
    got = []
    for r in reqs:
        rid = eng.add_request(r.prompt_ids, r.images, r.params)
        got.append(eng.run_to_completion()[rid])
    assert max(len(r.prompt_ids) for r in reqs) > 300  # several chunks
    assert got == alone and eng.sched.all_free


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


def test_warmup_captures_every_decode_bucket_up_to_max_num_seqs(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `LLM.warmup` (server and batch start) captures: each batch bucket up to the one holding
    max_num_seqs, once; nothing when graphs are off (the CPU); a failed capture turns graphs off."""
    runner = llm.engine.runner
    assert llm.warmup() == 0 and runner.graphs == {}  # CPU: no graphs
    captured: list[int] = []
    monkeypatch.setattr(runner, "use_graphs", True)
    monkeypatch.setattr(runner, "graphs", {})
    monkeypatch.setattr(runner, "_capture", lambda b: captured.append(b) or ("graph", {}))
    assert runner.warmup(20) == 6 and captured == [1, 2, 4, 8, 16, 24]
    assert runner.warmup(48) == 2 and captured[6:] == [32, 48]  # the ones already there are kept
    monkeypatch.setattr(llm.engine.sched, "max_num_seqs", 64)
    assert llm.warmup() == 1 and captured[-1] == 64
    # and every prefill length bucket and vision chunk size, each once
    from phi3v.engine.runner import PREFILL_BUCKETS

    pre, vis = llm.engine.prefill_runner, llm.engine.vision_runner
    likes: list[tuple[int, tuple, torch.dtype]] = []
    for r in (pre, vis):
        monkeypatch.setattr(r, "use_graphs", True)
        monkeypatch.setattr(r, "graphs", {})
        monkeypatch.setattr(r, "_capture", lambda b, like: likes.append((b, tuple(like.shape), like.dtype)) or
                            ("graph", None, None))
    assert llm.warmup() == len(PREFILL_BUCKETS) + 17
    dt = llm.engine.dtype
    assert likes == [(b, (1, llm.config.hidden_size), dt) for b in PREFILL_BUCKETS] + \
        [(n, (1, 3, 336, 336), dt) for n in range(1, 18)]
    assert llm.warmup() == 0

    def fail(b: int) -> None:
        raise RuntimeError("capture failed")

    monkeypatch.setattr(runner, "graphs", {})
    monkeypatch.setattr(runner, "_capture", fail)
    assert runner.warmup(8) == 0 and runner.use_graphs is False


def test_vision_runner_replays_a_graph_of_exactly_each_chunk_of_at_most_17_crops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """N crops run in chunks of at most 17, each replayed as a graph of exactly its size (no padding crops,
    so only 17 shapes ever); the features equal the tower's over all N at once. `warmup` captures every
    chunk size once; a failed capture falls back to the eager tower."""
    from phi3v.engine.runner import VISION_CHUNK, VisionRunner

    seen: list[int] = []

    def tower(x: torch.Tensor) -> torch.Tensor:  # (n, 3, 336, 336) -> (n, 576, 2): a stand-in CLIP
        seen.append(x.shape[0])
        return x[:, :1].reshape(x.shape[0], -1)[:, :1152].reshape(x.shape[0], 576, 2) * 2

    vr = VisionRunner(tower, torch.device("cpu"), use_graphs=True)
    captured: list[int] = []

    class Replay:  # what capture would give: replay() runs the tower on the static input
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

        def replay(self) -> None:
            self.y.copy_(tower(self.x))

    def capture(n: int, like: torch.Tensor):
        captured.append(n)
        x = torch.zeros((n, *like.shape[1:]))
        y = torch.zeros(n, 576, 2)
        return Replay(x, y), x, y

    monkeypatch.setattr(vr, "_capture", capture)
    assert VISION_CHUNK == 17
    for n, chunks in ((5, [5]), (7, [7]), (17, [17]), (20, [17, 3]), (33, [17, 16]), (70, [17] * 4 + [2]),
                      (128, [17] * 7 + [9])):
        seen.clear()
        px = torch.randn(n, 3, 336, 336)
        out = vr(px)
        assert seen == chunks, (n, seen)
        assert out.shape == (n, 576, 2) and torch.equal(out, tower(px)), n
    assert sorted(vr.graphs) == [2, 3, 5, 7, 9, 16, 17] and sorted(captured) == sorted(vr.graphs)
    assert vr.warmup(torch.zeros(1, 3, 336, 336)) == 17 - 7 and sorted(vr.graphs) == list(range(1, 18))
    assert vr.warmup(torch.zeros(1, 3, 336, 336)) == 0 and len(captured) == 17  # each size once

    def fail(n: int, like: torch.Tensor) -> None:
        raise RuntimeError("capture failed")

    vr = VisionRunner(tower, torch.device("cpu"), use_graphs=True)
    monkeypatch.setattr(vr, "_capture", fail)
    seen.clear()
    px = torch.randn(40, 3, 336, 336)
    assert torch.equal(vr(px), tower(px)) and vr.use_graphs is False and seen == [17, 17, 6, 40]  # eager chunks
    seen.clear()
    assert torch.equal(vr(px), tower(px)) and seen == [40, 40]  # graphs off from then on: all at once


def test_warmup_requests_leave_no_trace_and_change_no_output(llm: LLM) -> None:
    """The blank warm-up requests (run by Engine.warmup on CUDA) go through encode, embed, eager and batched
    prefill, and decode; afterwards blocks, image cache and stats are as before and a real request's tokens
    equal the reference generator's."""
    eng = llm.engine
    req = llm.prepare(*PROMPTS[4][:1], [image_path(n) for n in PROMPTS[4][1]], SamplingParams(max_tokens=6,
                                                                                             ignore_eos=True), 4)
    stats, cached = dict(eng.stats), list(eng.images.cache)
    batched = eng.stats["batched_prefills"]
    calls = []
    orig = eng.prefiller.prefill_batch
    eng.prefiller.prefill_batch = lambda *a: calls.append(len(a[0])) or orig(*a)
    try:
        eng.warmup_requests()
    finally:
        del eng.prefiller.prefill_batch
    assert calls == [2]  # the two 1x2 images' prompts went through one batched prefill
    assert eng.stats == stats and eng.stats["batched_prefills"] == batched
    assert list(eng.images.cache) == cached and not eng.has_unfinished() and eng.sched.all_free
    c = llm.generate(*PROMPTS[4][:1], images=[image_path(n) for n in PROMPTS[4][1]],
                     sampling_params=SamplingParams(max_tokens=6, ignore_eos=True), num_crops=4)
    assert c.token_ids == _reference(llm, req, 6)
