"""A streamed chat answer ends, as a whole one does, once its task outlives the preset's
timeouts: the task is cancelled and the stream says why, rather than sending keep-alives
forever (which also reset the openai SDK's read timeout)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import orjson

from gpulane.api import openai as face


class StuckNode:
    """A node whose task stays queued: follow only ever sends keep-alives."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.task = SimpleNamespace(id="t1", created_at=1.0,
                                    state=SimpleNamespace(final=False))

    async def follow(self, task_id: str, after: int, quiet_s: float
                     ) -> AsyncIterator[list[Any]]:
        while True:
            yield []

    async def get(self, task_id: str) -> Any:
        return self.task

    async def cancel(self, task_id: str) -> None:
        self.cancelled.append(task_id)


async def test_a_chat_stream_whose_task_never_ends_is_cut_and_the_task_cancelled() -> None:
    node = StuckNode()
    chunks = [c async for c in face._stream(node, node.task, "echo-stream", 0.0)]  # type: ignore[arg-type]
    assert chunks[-1] == b"data: [DONE]\n\n"
    error = orjson.loads(chunks[-2].removeprefix(b"data: "))["error"]
    assert error["code"] == "task_timeout" and error["type"] == "server_error"
    for pending in list(face._cancels):
        await pending
    assert node.cancelled == ["t1"]
