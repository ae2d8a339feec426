"""gpulane.notify: version counters per key and the waiters woken by the next change.

Timeouts are driven by ``loop_clock`` (tests/conftest.py), never waited out.
"""

from __future__ import annotations

import asyncio

from gpulane.notify import Notifier
from tests.conftest import LoopClock, settle

GUARD_S = 10.0
"""Failure guard for awaiting an answer that should come at once: never the assertion."""
LONG_S = 3600.0
"""A timeout that no test run reaches unless the test advances the clock past it."""


async def test_wait_returns_true_when_notified() -> None:
    n = Notifier()
    seen = n.version("t")
    waiters = [asyncio.create_task(n.wait("t", seen, timeout=LONG_S)) for _ in range(3)]
    await settle()  # let them park
    assert not any(w.done() for w in waiters)
    n.notify("t")
    assert await asyncio.wait_for(asyncio.gather(*waiters), GUARD_S) == [True, True, True]
    assert n.version("t") == seen + 1
    assert not n.waited_on("t")  # the woken waiters left nothing behind


async def test_wait_times_out_with_false_and_not_before(loop_clock: LoopClock) -> None:
    n = Notifier()
    waiter = asyncio.create_task(n.wait("t", n.version("t"), timeout=60))
    await settle()
    n.notify("other")  # another key's change does not count
    await loop_clock.advance(50)
    assert not waiter.done()
    await loop_clock.advance(20)
    assert await asyncio.wait_for(waiter, GUARD_S) is False
    assert not n.waited_on("t")  # the timed-out waiter left nothing behind


async def test_no_lost_wake_up_between_version_and_wait() -> None:
    n = Notifier()
    seen = n.version("t")
    n.notify("t")  # the change lands after the read, before the wait
    # True without parking: a parked wait with no time left would answer False.
    assert await n.wait("t", seen, timeout=0) is True


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    n = Notifier()
    waiter = asyncio.create_task(n.wait("t", n.version("t"), timeout=LONG_S))
    await settle()
    assert n.waited_on("t")
    waiter.cancel()
    await settle()
    assert waiter.cancelled() and not n.waited_on("t")


async def test_forget_drops_the_entry_and_a_parked_waiter_still_wakes() -> None:
    n = Notifier()
    n.notify("t")
    seen = n.version("t")
    waiter = asyncio.create_task(n.wait("t", seen, timeout=LONG_S))
    await settle()
    n.forget("t")
    assert not waiter.done()  # a forget is no change to wake anyone for
    n.notify("t")
    assert await asyncio.wait_for(waiter, GUARD_S) is True
    n.forget("t")
    assert len(n) == 0


async def test_a_version_read_before_a_forget_never_comes_back() -> None:
    """The race the bounded notifier must survive: a follower reads the version (the key has
    no entry yet), then reads the task (not final), and before it parks the task is claimed,
    finished and forgotten. Its wait must not park on a version that looks unchanged."""
    n = Notifier()
    seen_absent = n.version("t")
    n.notify("t")  # claimed
    n.notify("t")  # finished
    n.forget("t")
    assert n.version("t") != seen_absent
    assert await n.wait("t", seen_absent, timeout=0) is True
    # Read while it had an entry: after the forget the version differs too.
    n.notify("u")
    seen_live = n.version("u")
    n.forget("u")
    assert n.version("u") != seen_live
    assert await n.wait("u", seen_live, timeout=0) is True
    # Versions only grow, across keys and forgets alike.
    history = [seen_absent, seen_live, n.version("u")]
    assert history == sorted(set(history))


async def test_forgetting_every_finished_key_returns_the_notifier_to_empty() -> None:
    n = Notifier()
    for i in range(2000):
        n.notify(f"t{i}")
        n.notify(f"t{i}")
        n.forget(f"t{i}")
    assert len(n) == 0
    n.forget("never-seen")  # nothing to drop: harmless
    assert len(n) == 0
