"""The scheduler alone: queues, KV block reservation, finish and abort (no torch)."""

import random

import pytest

from phi3v.sampling_params import SamplingParams
from phi3v.engine.scheduler import FINISHED, RUNNING, WAITING, Scheduler, Sequence


def seq(rid: str, n_prompt: int = 5, max_tokens: int = 4, eos=frozenset({2})) -> Sequence:
    return Sequence(rid=rid, prompt_ids=list(range(10, 10 + n_prompt)), params=SamplingParams(max_tokens=max_tokens), eos_ids=eos)


def test_admission_is_fifo_and_bounded_by_max_num_seqs():
    s = Scheduler(max_num_seqs=2, max_model_len=64, num_blocks=100, block_size=4)
    for i in range(4):
        s.add(seq(f"r{i}"))
    got = s.admit()
    assert [q.rid for q in got] == ["r0", "r1"]
    assert [q.rid for q in s.waiting] == ["r2", "r3"]
    assert s.admit() == [] and not s.can_admit()  # no free row
    assert s.free_slots == 0 and s.num_unfinished == 4


def test_admission_reserves_blocks_for_prompt_plus_max_tokens_and_waits_for_memory():
    s = Scheduler(max_num_seqs=8, max_model_len=64, num_blocks=16, block_size=4)
    a = seq("a", n_prompt=5, max_tokens=4)  # 9 tokens -> 3 blocks
    b = seq("b", n_prompt=20, max_tokens=100)  # capped at the context: 64 tokens
    c = seq("c", n_prompt=3, max_tokens=1)  # 4 tokens -> 1 block
    for q in (a, b, c):
        s.add(q)
    assert a.max_len == 9 and b.max_len == 64 and c.max_len == 4
    with pytest.raises(ValueError, match="do not hold one sequence"):
        Scheduler(max_num_seqs=1, max_model_len=64, num_blocks=15, block_size=4)
    s2 = Scheduler(max_num_seqs=8, max_model_len=40, num_blocks=12, block_size=4)
    for q in (seq("a", 5, 4), seq("b", 20, 100), seq("c", 3, 1)):
        s2.add(q)
    got = s2.admit()
    assert [q.rid for q in got] == ["a"]  # b needs 10 blocks, 9 are free: FIFO waits, c does not jump the queue
    assert len(got[0].blocks) == 3 and len(set(got[0].blocks)) == 3
    assert s2.kv_usage == pytest.approx(3 / 12)
    s2.finish(got[0], "stop")
    assert s2.all_free and got[0].blocks == []
    got = s2.admit()
    assert [q.rid for q in got] == ["b", "c"]
    assert not set(got[0].blocks) & set(got[1].blocks)  # disjoint block tables
    assert len(got[0].blocks) == 10 and len(got[1].blocks) == 1


def test_finish_keeps_order_and_frees_blocks():
    s = Scheduler(max_num_seqs=3, max_model_len=64, num_blocks=48, block_size=4)
    for i in range(3):
        s.add(seq(f"r{i}"))
    a, b, c = s.admit()
    s.finish(a, "stop")
    assert s.running == [b, c]
    assert a.status == FINISHED and a.finish_reason == "stop" and a.blocks == []
    s.finish(c, "length")
    assert s.running == [b]
    s.finish(b, "abort")
    assert s.all_free


def test_abort_waiting_request_and_duplicate_ids():
    s = Scheduler(max_num_seqs=1, max_model_len=64, num_blocks=16, block_size=4)
    s.add(seq("a"))
    s.add(seq("b"))
    s.admit()
    b = s.get("b")
    assert b.status == WAITING
    s.finish(b, "abort")
    assert list(s.waiting) == [] and s.get("b") is None
    with pytest.raises(ValueError, match="already in use"):
        s.add(seq("a"))


def test_prompt_longer_than_context_is_refused():
    s = Scheduler(max_num_seqs=1, max_model_len=8, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="context holds 8"):
        s.add(seq("x", n_prompt=8))


def test_check_finish_reasons():
    q = seq("q", n_prompt=3, max_tokens=3)
    q.max_len = 100
    q.output_ids = [5]
    assert q.check_finish() is None
    q.output_ids = [5, 2]
    assert q.check_finish() == "stop"
    q.params = SamplingParams(max_tokens=3, ignore_eos=True)
    assert q.check_finish() is None
    q.output_ids = [5, 2, 9]
    assert q.check_finish() == "length"
    r = seq("r", n_prompt=3, max_tokens=50)
    r.max_len = 5
    r.output_ids = [4, 4]
    assert r.check_finish() == "length"  # the context is full


def test_random_churn_never_shares_a_block_and_frees_everything():
    rng = random.Random(0)
    s = Scheduler(max_num_seqs=4, max_model_len=64, num_blocks=40, block_size=4)
    for step in range(400):
        if rng.random() < 0.4:
            s.add(seq(f"r{step}", n_prompt=rng.randint(1, 40), max_tokens=rng.randint(1, 30)))
        s.admit()
        if s.running and rng.random() < 0.5:
            victim = rng.choice(s.running + list(s.waiting))
            s.finish(victim, "abort")
        owned = [b for q in s.running for b in q.blocks]
        assert len(owned) == len(set(owned)) and not set(owned) & set(s.free_blocks)
        assert len(owned) + len(s.free_blocks) == 40
        assert all(q.status == RUNNING and len(q.blocks) * 4 >= q.max_len for q in s.running)
        assert len(s.running) <= 4
    for q in list(s.running) + list(s.waiting):
        s.finish(q, "abort")
    assert s.num_unfinished == 0 and s.all_free and not s.seqs
