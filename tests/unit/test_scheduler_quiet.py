"""scheduling/quiet.py: when a freed worker's notice may skip the scheduler's pass."""

from __future__ import annotations

from gpulane.scheduling.quiet import Quiet
from gpulane.store import QueueHead

QUEUES = [("sleep", "gpu"), ("sleep", "cpu"), ("embed", "gpu")]


def _drained_pass(q: Quiet) -> None:
    q.started()
    q.asked(QUEUES, [QueueHead("sleep", "gpu", 50, 1, "t1")])
    q.emptied(("sleep", "gpu"))  # its claim got less than it asked
    q.ended(frozenset(QUEUES))


def test_a_pass_that_left_every_queue_empty_lets_freed_notices_skip_theirs() -> None:
    q = Quiet()
    _drained_pass(q)
    assert q.drained
    q.notice = True
    assert q.woken() is False  # a freed worker: nothing to place
    q.notice = False
    assert q.woken() is True  # anything else may have queued work
    assert not q.drained
    q.notice = True
    assert q.woken() is True  # not drained any more: the notice wakes a pass again


def test_a_queue_with_a_head_left_or_never_asked_is_not_empty() -> None:
    q = Quiet()
    q.started()
    q.asked(QUEUES, [QueueHead("sleep", "gpu", 50, 1, "t1")])  # placed nothing: head stays
    q.ended(frozenset(QUEUES))
    assert not q.drained
    q.started()
    q.asked(QUEUES[1:], [])  # ("sleep", "gpu") was not asked (no room for it)
    q.ended(frozenset(QUEUES))
    assert not q.drained


def test_a_wake_during_the_pass_keeps_the_queues_not_drained() -> None:
    q = Quiet()
    q.started()
    q.asked(QUEUES, [])
    assert q.woken() is True  # a submit landed while the pass awaited the store
    q.ended(frozenset(QUEUES))
    assert not q.drained
    q.notice = True
    assert q.woken() is True


def test_a_fresh_quiet_knows_nothing() -> None:
    q = Quiet()
    q.notice = True
    assert q.woken() is True
