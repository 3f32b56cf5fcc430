"""The scheduler alone: queues, slots, compaction moves, finish and abort (no torch)."""

import random

import pytest

from phi3v.engine.sampler import SamplingParams
from phi3v.engine.scheduler import FINISHED, RUNNING, WAITING, Scheduler, Sequence


def seq(rid: str, n_prompt: int = 5, max_tokens: int = 4, eos=frozenset({2})) -> Sequence:
    return Sequence(rid=rid, prompt_ids=list(range(10, 10 + n_prompt)), params=SamplingParams(max_tokens=max_tokens), eos_ids=eos)


def test_admission_is_fifo_and_bounded_by_slots():
    s = Scheduler(max_num_seqs=2, slot_len=64)
    for i in range(4):
        s.add(seq(f"r{i}"))
    got = s.admit()
    assert [q.rid for q in got] == ["r0", "r1"]
    assert [q.slot for q in s.running] == [0, 1]
    assert [q.rid for q in s.waiting] == ["r2", "r3"]
    assert s.admit() == []  # no free slot
    assert s.free_slots == 0 and s.num_unfinished == 4


def test_finish_moves_last_slot_into_the_hole():
    s = Scheduler(max_num_seqs=3, slot_len=64)
    for i in range(3):
        s.add(seq(f"r{i}"))
    a, b, c = s.admit()
    c.output_ids = [7, 8]
    move = s.finish(a, "stop")
    assert move == (2, 0, c.num_tokens)
    assert s.running == [c, b] and c.slot == 0 and b.slot == 1
    assert a.status == FINISHED and a.finish_reason == "stop" and a.slot == -1
    assert s.finish(b, "length") is None  # the last slot leaves: nothing to move
    assert s.running == [c]


def test_abort_waiting_request_and_duplicate_ids():
    s = Scheduler(max_num_seqs=1, slot_len=64)
    s.add(seq("a"))
    s.add(seq("b"))
    s.admit()
    b = s.get("b")
    assert b.status == WAITING
    assert s.finish(b, "abort") is None
    assert list(s.waiting) == [] and s.get("b") is None
    with pytest.raises(ValueError, match="already in use"):
        s.add(seq("a"))


def test_prompt_longer_than_context_is_refused():
    s = Scheduler(max_num_seqs=1, slot_len=8)
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
    assert r.check_finish() == "length"  # the slot is full


def test_random_churn_keeps_slots_compact_and_frees_everything():
    rng = random.Random(0)
    s = Scheduler(max_num_seqs=4, slot_len=64)
    alive = set()
    for step in range(400):
        if rng.random() < 0.4:
            rid = f"r{step}"
            s.add(seq(rid))
            alive.add(rid)
        s.admit()
        if s.running and rng.random() < 0.5:
            victim = rng.choice(s.running + list(s.waiting))
            s.finish(victim, "abort")
            alive.discard(victim.rid)
        assert [q.slot for q in s.running] == list(range(len(s.running)))
        assert all(q.status == RUNNING for q in s.running)
        assert len(s.running) <= 4
    for q in list(s.running) + list(s.waiting):
        s.finish(q, "abort")
    assert s.num_unfinished == 0 and s.free_slots == 4 and not s.seqs
