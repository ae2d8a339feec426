"""TaskNotifier.wake_all, what a redis store calls once its wake-up channel is back: every
waiter re-reads, and the entries nobody waits on go (an end announced while the channel was
down would have dropped them; kept, they would stay for good)."""

from __future__ import annotations

import asyncio

from gpulane.model import TaskSpec
from gpulane.store.base import TaskNotifier, new_task
from tests.conftest import settle


async def test_wake_all_wakes_each_waiter_and_drops_the_unwaited_entries() -> None:
    notifier = TaskNotifier()
    for task_id in ("a" * 24, "b" * 24):  # submitted here, ended elsewhere unheard
        notifier.notify(task_id, new_task(task_id, TaskSpec(preset="p", input=None), 1, 0.0))
    waited = "c" * 24
    result = asyncio.create_task(notifier.until_final(waited, notifier.version(waited), 60))
    stream = asyncio.create_task(notifier.wait(waited, notifier.version(waited), 60))
    await settle()  # both parked
    assert notifier.waited_on(waited)
    notifier.wake_all()
    assert await asyncio.wait_for(result, 5) is True  # re-read: no task in hand
    assert await asyncio.wait_for(stream, 5) is True
    assert notifier.version("a" * 24) == notifier.version("b" * 24)  # no entries of their own
    assert len(notifier) <= 1  # at most the woken key's, until its end
