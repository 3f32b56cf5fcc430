"""The scheduler alone (no torch): admission, KV blocks on demand, preemption, the prefix cache, chunked
prefill alternating with decode. After every test no block leaks and no reference count is negative."""

import random
from types import SimpleNamespace

import pytest

from phi3v.engine.block_pool import BlockPool, block_hashes
from phi3v.engine.scheduler import ScheduledBatch, Scheduler
from phi3v.engine.sequence import Sequence, Status
from phi3v.sampling_params import SamplingParams


def seq(rid: str, prompt: list[int] | int = 5, max_tokens: int = 4, images=()) -> Sequence:
    ids = list(range(10, 10 + prompt)) if isinstance(prompt, int) else list(prompt)
    return Sequence(rid=rid, prompt_ids=ids, params=SamplingParams(max_tokens=max_tokens),
                    images=[SimpleNamespace(key=k) for k in images], eos_ids=frozenset({2}))


def commit(s: Scheduler, batch: ScheduledBatch, token: int = 7) -> list[Sequence]:
    """What the engine does after running `batch`: positions computed, a token for every sequence that
    sampled, finishes. Returns the finished sequences."""
    done, sampled = [], []
    for c in batch.prefills:
        s.computed(c)
        if c.last:
            sampled.append(c.seq)
    for q in batch.decodes:
        sampled.append(q)
    for q in sampled:
        q.num_computed = q.num_tokens
        q.output_ids.append(token)
        if q.check_finish():
            s.finish(q, q.check_finish())
            done.append(q)
    return done


def check_pool(s: Scheduler) -> None:
    pool = s.pool
    assert min(pool.refs) >= 0
    held = [b for q in s.running for b in q.blocks]
    for b in range(pool.num_blocks):
        assert pool.refs[b] == held.count(b), b
    assert pool.num_free == pool.num_blocks - len(set(held))
    assert all(not q.blocks for q in s.waiting)


def drain(s: Scheduler, limit: int = 10_000) -> list[ScheduledBatch]:
    steps = []
    while s.num_unfinished and len(steps) < limit:
        b = s.schedule()
        assert b, "nothing scheduled while requests are unfinished"
        commit(s, b)
        check_pool(s)
        steps.append(b)
    assert not s.num_unfinished and s.all_free
    return steps


def test_admission_is_fifo_and_bounded_by_max_num_seqs():
    s = Scheduler(max_num_seqs=2, max_model_len=64, num_blocks=100, block_size=4)
    for i in range(4):
        s.add(seq(f"r{i}"))
    b = s.schedule()
    assert [c.seq.rid for c in b.prefills] == ["r0", "r1"] and all(c.start == 0 and c.last for c in b.prefills)
    assert [q.rid for q in s.waiting] == ["r2", "r3"]
    commit(s, b)
    b = s.schedule()  # no free row: decode
    assert [q.rid for q in b.decodes] == ["r0", "r1"] and not b.prefills
    drain(s)


def test_blocks_are_taken_as_sequences_grow_not_reserved():
    s = Scheduler(max_num_seqs=8, max_model_len=64, num_blocks=16, block_size=4)
    a = seq("a", 5, max_tokens=40)
    s.add(a)
    assert a.max_len == 45
    commit(s, s.schedule())
    assert len(a.blocks) == 2  # the prompt's 5 positions, not 45
    for _ in range(3):
        b = s.schedule()
        assert b.decodes == [a]
        commit(s, b)
    assert len(a.blocks) == s.blocks_for(a.num_computed) == 2  # positions 0..7 computed
    b = s.schedule()
    assert len(a.blocks) == 3  # the next decode writes position 8: one more block, just now
    commit(s, b)
    drain(s)


def test_memory_pressure_preempts_the_newest_and_it_resumes_before_newer_requests():
    # 6 blocks of 4: three sequences of 5-token prompts fit (2 blocks each); growing needs more
    s = Scheduler(max_num_seqs=8, max_model_len=24, num_blocks=6, block_size=4, enable_prefix_caching=False)
    s.watermark = 0
    seqs = [seq(f"r{i}", [20 + i] * 5, max_tokens=12) for i in range(3)]
    for q in seqs:
        s.add(q)
    commit(s, s.schedule())
    assert [q.status for q in seqs] == [Status.RUNNING] * 3 and s.pool.num_free == 0
    late = seq("late", 3, max_tokens=2)
    s.add(late)
    b = s.schedule()
    while not seqs[2].num_preemptions:
        assert b.decodes == seqs and late.status is Status.WAITING  # no free block for late
        commit(s, b)
        b = s.schedule()  # at position 8 every row needs a third block: r2, the newest, goes back to the queue
    assert seqs[2].status is Status.WAITING and seqs[2].blocks == [] and seqs[2].num_preemptions == 1
    assert list(s.waiting) == [seqs[2], late]  # before the request that arrived after it
    assert b.decodes == seqs[:2]
    n_at = seqs[2].num_tokens  # its prompt and the tokens it had generated
    assert n_at > 5
    commit(s, b)
    check_pool(s)
    steps = drain(s)
    assert s.num_preemptions >= 1
    assert all(len(q.output_ids) == 12 for q in seqs) and len(late.output_ids) == 2
    # the preempted one resumed with all its tokens so far recomputed by a prefill, not from scratch
    resumed = [c for b in steps for c in b.prefills if c.seq is seqs[2]]
    assert resumed[0].start == 0 and resumed[0].end == n_at


def test_preemption_under_random_load_never_leaks_or_starves():
    rng = random.Random(0)
    s = Scheduler(max_num_seqs=5, max_model_len=40, num_blocks=12, block_size=4, max_prefill_tokens=16)
    for i in range(30):
        s.add(seq(f"r{i}", [rng.randrange(3, 9) for _ in range(rng.randrange(2, 20))], max_tokens=rng.randrange(1, 15)))
    drain(s)


def test_prefix_cache_hits_whole_blocks_and_shares_them():
    s = Scheduler(max_num_seqs=4, max_model_len=64, num_blocks=20, block_size=4)
    prompt = list(range(100, 114))  # 14 tokens: 3 full blocks
    a = seq("a", prompt, max_tokens=3)
    s.add(a)
    commit(s, s.schedule())
    b = seq("b", prompt, max_tokens=3)  # the same prompt while a runs
    s.add(b)
    batch = s.schedule()
    while not batch.prefills:
        commit(s, batch)
        batch = s.schedule()
    assert [c.seq for c in batch.prefills] == [b] and batch.prefills[0].start == 12  # 3 blocks from the cache
    assert b.num_cached == 12 and b.blocks[:3] == a.blocks[:3] and s.pool.refs[a.blocks[0]] == 2
    commit(s, batch)
    drain(s)
    # nobody holds them now, but the cache does: a third request with a longer prompt hits all four blocks
    c = seq("c", prompt + [1, 2, 3, 4, 5], max_tokens=1)
    s.add(c)
    batch = s.schedule()
    assert batch.prefills[0].start == 12 and c.num_cached == 12
    commit(s, batch)
    drain(s)


def test_prefix_cache_keeps_at_least_the_last_token_to_compute():
    s = Scheduler(max_num_seqs=4, max_model_len=64, num_blocks=20, block_size=4)
    prompt = list(range(100, 108))  # exactly 2 blocks
    for rid in ("a", "b"):
        q = seq(rid, prompt, max_tokens=1)
        s.add(q)
        batch = s.schedule()
        commit(s, batch)
    assert batch.prefills[0].start == 4 and batch.prefills[0].end == 8  # one block recomputed, for the logits
    drain(s)


def test_prefix_cache_key_includes_images_and_the_rope_regime():
    h = block_hashes([1, -1, -1, -1, -1, 5, 6, 7], ["img-A"], 4, False)
    assert h == block_hashes([1, -1, -1, -1, -1, 5, 6, 7], ["img-A"], 4, False)
    assert h[0] != block_hashes([1, -1, -1, -1, -1, 5, 6, 7], ["img-B"], 4, False)[0]
    assert h[0] != block_hashes([1, -1, -1, -1, -1, 5, 6, 7], ["img-A"], 4, True)[0]
    # the second block differs only by the offsets inside the image: still a different key
    assert block_hashes([-1] * 8, ["k"], 4, False)[1] != block_hashes([-1] * 8, ["k"], 4, False)[0]
    # a chain: a different first block changes every later key
    assert block_hashes([2, 2, 2, 2, 5, 6, 7, 8], [], 4, False)[1] != block_hashes([3, 2, 2, 2, 5, 6, 7, 8], [], 4, False)[1]
    s = Scheduler(max_num_seqs=4, max_model_len=64, num_blocks=20, block_size=4)
    starts = {}
    for rid, key in (("a", "img-A"), ("b", "img-B"), ("c", "img-A")):
        q = seq(rid, [1, -1, -1, -1, -1, -1, -1, -1, -1, 5, 6], max_tokens=1, images=[key])
        s.add(q)
        batch = s.schedule()
        starts[rid] = batch.prefills[0].start
        commit(s, batch)
    assert starts == {"a": 0, "b": 0, "c": 8}  # another image: no hit; the same image again: its blocks
    drain(s)


def test_cached_blocks_are_evicted_least_recent_first_and_only_when_needed():
    pool = BlockPool(4)
    x = pool.allocate(2)
    for i, b in enumerate(x):
        pool.register(b, bytes([i]))
    pool.release(x)
    assert pool.num_free == 4 and pool.lookup([b"\x00", b"\x01"]) == x  # free, still cached
    y = pool.allocate(2)  # the never-cached blocks go first
    assert not set(y) & set(x) and pool.lookup([b"\x00", b"\x01"]) == x
    z = pool.allocate(1)  # then the least recently released cached block: the chain's last one
    assert z == [x[1]] and pool.lookup([b"\x00", b"\x01"]) == [x[0]]
    pool.take([x[0]])
    assert pool.num_free == 0
    pool.release(y + z + [x[0]])
    assert pool.num_free == 4 and min(pool.refs) == 0
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([y[0]])


def test_long_prompt_is_prefilled_in_chunks_with_decode_steps_between():
    s = Scheduler(max_num_seqs=4, max_model_len=200, num_blocks=60, block_size=4, max_prefill_tokens=32)
    short = seq("short", 5, max_tokens=30)
    s.add(short)
    commit(s, s.schedule())
    long = seq("long", [3] * 100, max_tokens=2)
    s.add(long)
    kinds, starts = [], []
    while long.status is not Status.FINISHED:
        b = s.schedule()
        kinds.append("p" if b.prefills else "d")
        starts += [c.start for c in b.prefills if c.seq is long]
        commit(s, b)
    assert starts == [0, 32, 64, 96]  # 100 tokens in chunks of the 32-token budget
    assert "pp" not in "".join(kinds[:8])  # the running request decodes between the chunks
    drain(s)


def test_the_long_rope_crossing_recomputes_the_sequence_in_the_long_regime():
    s = Scheduler(max_num_seqs=2, max_model_len=64, num_blocks=40, block_size=4, long_rope_after=10)
    a = seq("a", 8, max_tokens=6)
    s.add(a)
    commit(s, s.schedule())
    assert not a.long_rope
    recomputed = []
    while a.status is not Status.FINISHED:
        b = s.schedule()
        recomputed += [(c.start, c.end, a.long_rope) for c in b.prefills]
        commit(s, b)
    assert recomputed == [(0, 11, True)]  # at 11 tokens (> 10): every position again, with long factors
    drain(s)
