"""The file references of submitted inputs, resolved off the event loop, and a keyed repeat
whose upload is gone.

Resolving a reference walks its path (realpath: one lstat per component, and a stat): about
50 us a file on local disk, so a bulk of 10,000 inputs naming 256 files each would hold the
event loop for minutes, and on shared storage (NFS) one slow server stalls every request of
the node. So the API resolves every input of a request in one worker thread, and only when
one names files (most submits don't, and skip the hop).

A keyed submit (Idempotency-Key) is answered with the task its key made, as the store does,
even when a file it names is gone since (an upload deleted or expired, a file under a root
removed once the task ran): its client only asks again after a lost answer. Its references
then become the paths they were stored as, unchecked for existence (never for the roots), and
the store answers the task or a 409 (a different body); without a task for the key, the 404
(400 file_not_found) stands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gpulane.errors import RequestError
from gpulane.files import Files, names_files
from gpulane.node import Node

GONE = frozenset({"unknown_file", "file_not_found"})
"""The codes of a file reference to nothing (an upload, a path under a root): all a keyed
repeat may get past."""


async def resolve_inputs(node: Node, inputs: Sequence[Any],
                         wheres: Sequence[str], keys: Sequence[str | None],
                         owner: str | None) -> list[Any]:
    """Each input with its file references resolved (files.Files.resolve_input), in one
    worker thread; an item whose upload is gone but whose key made a task already gets its
    ids as their paths (see the module docstring). The first bad reference raises."""
    if not any(names_files(i) for i in inputs):
        return list(inputs)
    out, missing = await asyncio.to_thread(_resolve_all, node.files, inputs, wheres, keys,
                                           owner)
    for key, error in missing:
        if await node.store.task_for_key(key) is None:
            raise error
    return out


def _resolve_all(files: Files, inputs: Sequence[Any], wheres: Sequence[str],
                 keys: Sequence[str | None], owner: str | None
                 ) -> tuple[list[Any], list[tuple[str, RequestError]]]:
    out: list[Any] = []
    missing: list[tuple[str, RequestError]] = []  # (key, the 404) of a keyed repeat
    for input, where, key in zip(inputs, wheres, keys, strict=True):
        try:
            out.append(files.resolve_input(input, where, owner))
        except RequestError as exc:
            if key is None or exc.code not in GONE:
                raise
            out.append(files.resolve_input(input, where, owner, exists_checked=False))
            missing.append((key, exc))
    return out, missing
