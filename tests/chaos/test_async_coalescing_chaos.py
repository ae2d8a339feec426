"""AsyncClient's coalesced run() and enqueue() through a lossy network to a real
``gpulane serve``: no call lost, no task made twice, every acknowledged task found and ended.

Resets land before, during and after the server acts on a bulk or a results poll; the bulk's
items keep their Idempotency-Keys through the retries, so a retried bulk never makes a task
twice. Assertions are on counts.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from gpulane.client import AsyncClient
from gpulane.errors import ClientError
from tests.chaos.conftest import ServerProcess
from tests.chaos.proxy import FaultProxy
from tests.chaos.test_chaos import server_tasks

CALLS = 1000
CALLERS = 64


async def test_coalesced_runs_and_enqueues_lose_nothing_on_a_lossy_network(
        server: ServerProcess) -> None:
    # Coalesced, 2,000 tasks take a few dozen requests: a sixth of their reads meet a reset.
    with FaultProxy(server.port, reset_rate=0.15, spike_rate=0.1, spike_s=0.2,
                    seed=2025) as proxy:
        async with AsyncClient(proxy.url) as client:
            left = list(range(CALLS))
            results: list[dict[str, Any] | ClientError] = []

            async def caller() -> None:
                while left:
                    n = left.pop()
                    try:
                        results.append(await client.run("sleep", {"ms": 0, "n": n}))
                    except ClientError as exc:
                        results.append(exc)

            await asyncio.gather(*(caller() for _ in range(CALLERS)))
            futures = []
            for burst in range(10):  # ten bursts of enqueues, a bulk each
                futures += [client.enqueue("sleep", {"ms": 0, "n": CALLS + 100 * burst + i})
                            for i in range(100)]
                await asyncio.sleep(0)
            await client.flush()
            ends = await asyncio.gather(*(f.result(timeout=60) for f in futures),
                                        return_exceptions=True)
            refused = [f for f in futures if not f.acknowledged()]
            for f in refused:  # told, not lost: its acknowledgement raises
                try:
                    await f.acknowledgement()
                except ClientError:
                    continue
                raise AssertionError(f"{f!r} neither acknowledged nor refused")
            stats = client.stats()

    done = [r for r in results if isinstance(r, dict)]
    assert len(done) >= 0.99 * CALLS, [r for r in results if not isinstance(r, dict)][:5]
    assert all(r["state"] == "succeeded" and r["output"] == {"slept_ms": 0} for r in done)
    acked = [f for f in futures if f.acknowledged()]
    assert len(acked) >= 0.9 * CALLS, (ends[:1], stats, proxy.stats.resets)
    ended = [e for e in ends if isinstance(e, dict)]
    assert len(ended) >= len(acked) - 1, Counter(
        repr(e)[:200] for e in ends if not isinstance(e, dict))
    assert all(e["state"] == "succeeded" for e in ended)
    # The faults happened and were ridden out (by retries, or by the pool sending a safe request
    # again on a fresh connection when a reused one was cut before any answer).
    assert proxy.stats.total_resets >= 3 and stats["retries"] >= 1
    # One task per call or enqueue on the server, the one its caller got.
    tasks = [t for t in server_tasks(server.url) if t["preset"] == "sleep"]
    per_call = Counter(t["input"]["n"] for t in tasks)
    assert per_call and max(per_call.values()) == 1
    ids = {t["input"]["n"]: t["id"] for t in tasks}
    assert all(ids[r["input"]["n"]] == r["id"] for r in done)
    # Nothing acknowledged is missing: every acknowledged future's task is on the server.
    assert all(f.id in ids.values() for f in acked)
    print(f"{len(done)}/{CALLS} runs and {len(ended)}/{CALLS} enqueued ended; "
          f"{proxy.stats.total_resets} resets {proxy.stats.resets}, {proxy.stats.spikes} "
          f"spikes; {stats['retries']} retries; {len(tasks)} tasks on the server")
