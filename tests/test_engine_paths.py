"""The engine's prefill paths, CUDA-graph runners and warm-up on the tiny checkpoint: batched, padded (the graph
path, eagerly) and chunked prefill against one pass, what `warmup` captures, the vision tower's exact-size
chunks, and the blank warm-up requests."""

from __future__ import annotations

import pytest
import torch

from phi3v import LLM, SamplingParams

from phi3v.engine.graphs import PREFILL_BUCKETS, PrefillRunner

from engine_common import PROMPTS, image_path, reference_tokens

pytestmark = pytest.mark.usefixtures("kv_memory_is_free")  # after every test: the shared engine is empty


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
    llm.engine.reset_prefix_cache()  # whole prompts again, not prefix-cache hits
    before = llm.engine.stats["batched_prefills"]
    together = [c.token_ids for c in llm.generate_many(reqs)]
    assert llm.engine.stats["batched_prefills"] == before + 1
    assert together == alone
    refs = [reference_tokens(llm, r, 10) for r in reqs]
    assert together == refs


class EagerPaddedPrefill(PrefillRunner):
    """The graph path of short prompts with each "graph" replayed eagerly: the same padded buffers and forward."""

    def bucket(self, n: int) -> int | None:
        return next((b for b in PREFILL_BUCKETS if b >= n), None)

    def _capture(self, b: int, like: torch.Tensor):
        io = self._buffers(b, like)
        runner = self

        class Replay:  # what replaying the captured forward does
            def replay(self) -> None:
                io["logits"] = runner._forward(io)

        return Replay(), io


def test_padded_prefill_of_the_graph_path_equals_unpadded(llm: LLM) -> None:
    """Short prompts are prefilled padded to a length bucket (a CUDA graph on the GPU; here the same
    padded forward, eagerly): padding writes only the scratch block and the tokens do not change."""
    reqs = [llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=8, ignore_eos=True), nc)
            for prompt, names, nc in PROMPTS]
    plain = [llm.generate_many([r])[0].token_ids for r in reqs]
    eng = llm.engine
    prefiller = eng.runner.prefiller
    runner, padded_runner = prefiller.runner, EagerPaddedPrefill(llm.model, eng.cache, False)
    scratch = eng.cache.k[:, eng.cache.scratch].clone()
    try:
        prefiller.runner = padded_runner
        eng.reset_prefix_cache()  # whole prompts again, not prefix-cache hits
        padded = [llm.generate_many([r])[0].token_ids for r in reqs]
    finally:
        prefiller.runner = runner
    assert padded == plain
    assert sorted(padded_runner.graphs) == sorted({next(b for b in PREFILL_BUCKETS if b >= len(r.prompt_ids))
                                                   for r in reqs})
    assert not torch.equal(eng.cache.k[:, eng.cache.scratch], scratch)  # the padding went there


def test_chunked_prefill_across_blocks_equals_one_pass(llm: LLM) -> None:
    """Prompts prefilled in 100-token chunks (each chunk attends over the earlier ones read back from
    16-token blocks) give the same tokens as one-pass prefill."""
    from phi3v.engine.config import EngineConfig
    from phi3v.engine.engine import Engine

    reqs = [llm.prepare(prompt, [image_path(n) for n in names], SamplingParams(max_tokens=6, ignore_eos=True), nc)
            for prompt, names, nc in PROMPTS]
    alone = [llm.generate_many([r])[0].token_ids for r in reqs]
    eng = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=1, max_model_len=1024, kv_block_size=16, prefill_chunk=100, long_prefill_chunk=100))
    got = []
    for r in reqs:
        rid = eng.add_request(r.prompt_ids, r.images, r.params)
        got.append(eng.run_to_completion()[rid])
    assert max(len(r.prompt_ids) for r in reqs) > 300  # several chunks
    assert got == alone and eng.sched.all_free


def test_warmup_captures_every_decode_bucket_up_to_max_num_seqs(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `LLM.warmup` (server and batch start) captures: each batch bucket up to the one holding
    max_num_seqs, once; nothing when graphs are off (the CPU); a failed capture turns graphs off."""
    runner = llm.engine.runner.decoder
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
    from phi3v.engine.graphs import PREFILL_BUCKETS

    pre, vis = llm.engine.runner.prefill_graphs, llm.engine.runner.vision
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
    from phi3v.engine.graphs import VISION_CHUNK, VisionRunner

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
    stats, cached = dict(eng.stats), list(eng.runner.images.cache)
    batched = eng.stats["batched_prefills"]
    calls = []
    orig = eng.runner.prefiller.prefill_batch
    eng.runner.prefiller.prefill_batch = lambda *a: calls.append(len(a[0])) or orig(*a)
    try:
        eng.warmup_requests()
    finally:
        del eng.runner.prefiller.prefill_batch
    assert calls == [2]  # the two 1x2 images' prompts went through one batched prefill
    assert eng.stats == stats and eng.stats["batched_prefills"] == batched
    assert list(eng.runner.images.cache) == cached and not eng.has_unfinished() and eng.sched.all_free
    c = llm.generate(*PROMPTS[4][:1], images=[image_path(n) for n in PROMPTS[4][1]],
                     sampling_params=SamplingParams(max_tokens=6, ignore_eos=True), num_crops=4)
    assert c.token_ids == reference_tokens(llm, req, 6)
