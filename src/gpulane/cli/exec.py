"""``gpulane exec``: run any command under a GPU lease.

Waits for a lease, runs the command with CUDA_VISIBLE_DEVICES set to the granted devices,
renews while it runs, forwards SIGINT/SIGTERM, and on a ``preempt`` event sends SIGTERM, then
SIGKILL once the grace has passed. The lease is released on exit; the command's exit code is
gpulane's. It speaks the lease API with plain httpx: a command may run for days, and this
path must not depend on anything but the HTTP contract.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import click
import httpx

from gpulane.cli.client import client_options


def _fail(message: str, code: int) -> None:
    click.echo(f"gpulane exec: {message}", err=True)
    sys.exit(code)


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--vram", default=None, help="VRAM to hold, e.g. 8GiB or 4096 (MB)")
@click.option("--gpus", type=int, default=0, help="whole GPUs to hold instead of --vram")
@click.option("--priority", default="normal", help="immediate, normal, background or 0-100")
@click.option("--holder", default=None, help="name shown to others [the command's name]")
@click.option("--ttl-s", type=float, default=30.0, help="lease TTL; renewed at a third of it")
@click.option("--wait-s", type=float, default=600.0, help="how long to wait for a grant")
@click.option("--grace-s", type=float, default=10.0, help="time to exit after a preempt")
@click.option("--non-preemptible", is_flag=True, help="never ask this lease to step aside")
@client_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(vram: str | None, gpus: int, priority: str, holder: str | None, ttl_s: float,
             wait_s: float, grace_s: float, non_preemptible: bool, url: str,
             token: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND holding a GPU lease: gpulane exec --vram 8GiB -- python train.py"""
    if not vram and not gpus:
        _fail("give --vram SIZE or --gpus N", 2)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] = {"holder": holder or os.path.basename(command[0]),
                            "priority": int(priority) if priority.isdigit() else priority,
                            "ttl_s": ttl_s, "wait_s": wait_s, "grace_s": grace_s,
                            "preemptible": not non_preemptible}
    if gpus:
        body["gpus"] = gpus
    else:
        body["vram_mb"] = int(vram) if vram and vram.isdigit() else vram
    http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30, read=None))
    try:
        r = http.post("/v1/leases", json=body, timeout=wait_s + 30)
    except httpx.TransportError as exc:
        _fail(f"cannot reach gpulane at {url}: {exc} (start it with `gpulane serve`)", 3)
    if r.status_code != 201:
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith(
            "application/json") else {}
        _fail(f"no lease: {err.get('code', r.status_code)}: {err.get('message', r.text)}",
              4 if r.status_code == 408 else 2)
    lease = r.json()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": lease["cuda_visible_devices"],
           "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "GPULANE_LEASE_ID": lease["id"]}
    click.echo(f"gpulane exec: lease {lease['id']} on GPU(s) {lease['cuda_visible_devices']}",
               err=True)
    child = subprocess.Popen(list(command), env=env)
    done = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    threads = [threading.Thread(target=_renew, args=(http, lease, ttl_s, done), daemon=True),
               threading.Thread(target=_watch, args=(http, lease, child, done), daemon=True)]
    for t in threads:
        t.start()
    try:
        code = child.wait()
    finally:
        done.set()
        try:
            http.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
        except httpx.HTTPError:
            pass  # it expires on its own after ttl_s
        http.close()
    sys.exit(code if code >= 0 else 128 - code)


def _renew(http: httpx.Client, lease: dict[str, Any], ttl_s: float,
           done: threading.Event) -> None:
    while not done.wait(ttl_s / 3):
        try:
            r = http.post(f"/v1/leases/{lease['id']}/renew", json={"token": lease["token"]})
            if r.status_code == 409:
                click.echo("gpulane exec: the lease is gone (expired or revoked)", err=True)
                return
        except httpx.HTTPError as exc:  # keep trying until the TTL runs out
            click.echo(f"gpulane exec: renew failed: {exc}", err=True)


def _watch(http: httpx.Client, lease: dict[str, Any], child: subprocess.Popen[bytes],
           done: threading.Event) -> None:
    """On ``preempt``: SIGTERM now, SIGKILL when the grace is over."""
    try:
        with http.stream("GET", f"/v1/leases/{lease['id']}/events") as r:
            event = None
            for line in r.iter_lines():
                if done.is_set():
                    return
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "preempt":
                    grace = float(json.loads(line[6:]).get("grace_s", 10))
                    click.echo(f"gpulane exec: preempted; stopping the command "
                               f"(grace {grace:g}s)", err=True)
                    child.terminate()
                    if not done.wait(grace) and child.poll() is None:
                        child.kill()
                    return
    except httpx.HTTPError:
        return
