"""Containers a dead predecessor of this node left running, found by label and killed.

Killing a node (kill -9, a crash) kills its ``docker run`` clients with it (runtime/spawn.py),
but not their containers, which go on holding GPU memory. Each container carries labels
naming its node and the node's data dir (runtime/launchers.py); only one node holds a data
dir at a time (locks.py), so when a node starts, every running container with its name and
its data dir was started by a node that is gone: it is killed before this node starts any
container of its own.

Where docker is not installed this is skipped without a word; where it fails (no daemon, no
permission) it is logged once and skipped: the node runs on either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

log = logging.getLogger("gpulane.supervisor")

DOCKER_CALL_TIMEOUT_S = 30.0
"""How long one ``docker ps`` or ``docker kill`` may take before the cleanup gives up."""


async def _docker(argv: list[str]) -> tuple[bool, str]:
    """Run one docker command: (whether it succeeded, its stdout or its error)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        return False, str(exc)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DOCKER_CALL_TIMEOUT_S)
    except (TimeoutError, asyncio.CancelledError) as exc:
        # Not left running (nor its pipes open) past the node that asked: reaped here.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        return False, f"no answer within {DOCKER_CALL_TIMEOUT_S:g}s"
    if proc.returncode != 0:
        return False, err.decode("utf-8", "replace").strip() or f"exit {proc.returncode}"
    return True, out.decode("utf-8", "replace")


async def kill_leftovers(labels: dict[str, str], docker: str = "docker") -> list[str]:
    """Kill the running containers that carry every one of ``labels``; their ids."""
    if shutil.which(docker) is None:
        return []
    filters = [arg for key, value in sorted(labels.items())
               for arg in ("--filter", f"label={key}={value}")]
    ok, out = await _docker([docker, "ps", "-q", *filters])
    if not ok:
        log.info("could not look for containers a previous run left (docker ps: %s)", out)
        return []
    ids = out.split()
    if not ids:
        return []
    ok, out = await _docker([docker, "kill", *ids])
    if not ok:
        log.warning("could not kill the %d containers a previous run of this node left "
                    "(%s): docker kill: %s", len(ids), " ".join(ids), out)
        return []
    log.warning("killed %d containers a previous run of this node left: %s", len(ids),
                " ".join(ids))
    return ids
