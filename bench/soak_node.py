"""The soak scenarios' shared parts: the node under test (a ``gpulane serve`` subprocess that
can be killed -9 and restarted on the same port and data dir), readings of its process, and
submits retried until acknowledged. bench/soak.py is the command."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench._util import Proc, child_env, free_port, start_proc, wait_until

READY_TIMEOUT_S = 60.0
"""How long a (re)started node may take to answer /readyz."""
HTTP_TIMEOUT_S = 10.0
"""Per request; a node being killed answers nothing, and the submitter retries."""
RETRY_PAUSE_S = 0.05
"""Between a failed submit and its retry, unless the answer's Retry-After says longer."""
RETRY_AFTER_CAP_S = 2.0
"""Longest pause a Retry-After may impose here (the run has a schedule to keep)."""


class SoakNode:
    """``gpulane serve`` on one port and data dir, killable with -9 and restartable."""

    def __init__(self, workdir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.workdir = workdir
        self.argv = [sys.executable, "-m", "gpulane", "serve", "--data-dir", str(self.data_dir),
                     "--port", str(self.port), "--simulate-gpus", "2x24GiB",
                     "--log-level", "warning", *extra]
        self.env = child_env(**(env or {}))
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> float:
        """Start the node and wait until it is ready; the seconds that took."""
        began = time.monotonic()
        self.starts += 1
        self.proc = start_proc(f"serve-{self.starts}", self.argv, log_dir=self.workdir,
                               env=self.env)
        wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200,
                   timeout=READY_TIMEOUT_S, what="gpulane /readyz", proc=self.proc)
        return time.monotonic() - began

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill_hard(self) -> None:
        """kill -9 the node process alone: its workers must notice on their own."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is dead for this purpose
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def worker_pids(http: httpx.Client) -> list[int]:
    workers = http.get("/v1/workers", timeout=2).json()["workers"]
    return [w["pid"] for w in workers if w.get("pid") and w.get("state") != "exited"]


def status_view(http: httpx.Client) -> dict[str, Any] | None:
    """GET /v1/status where the node serves it."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        r = http.get("/v1/status", timeout=5)
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            return body
    return None


# --- chaos -----------------------------------------------------------------------------------


@dataclass
class Acks:
    """What the submitters were told: idempotency key -> task id, and what it took."""

    ids: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def post_until_acked(http: httpx.Client, path: str, body: dict[str, Any],
                     headers: dict[str, str], acks: Acks, give_up_at: float) -> Any:
    """POST until a 2xx answer (a retry carries the same idempotency keys), or give up."""
    while time.monotonic() < give_up_at:
        pause = RETRY_PAUSE_S
        try:
            r = http.post(path, json=body, headers=headers)
            with acks.lock:
                acks.answers[str(r.status_code)] += 1
            if r.status_code < 300:
                return r.json()
            if r.status_code < 500 and r.status_code not in (408, 429):
                raise RuntimeError(f"submit refused: {r.status_code} {r.text[:300]}")
            with contextlib.suppress(ValueError):
                pause = max(pause, min(float(r.headers.get("retry-after", 0)),
                                       RETRY_AFTER_CAP_S))
        except httpx.TransportError as exc:
            with acks.lock:
                acks.answers[type(exc).__name__] += 1
        with acks.lock:
            acks.retries += 1
        time.sleep(pause)
    return None


def wait_drained(http: httpx.Client, timeout: float) -> bool:
    """Until no task is queued or running (or timeout): True when drained."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if not any(http.get("/v1/tasks", params={"state": s, "limit": 1}).json()["tasks"]
                       for s in ("queued", "running")):
                return True
        time.sleep(0.2)
    return False
