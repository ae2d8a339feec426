"""A lease storm over real HTTP: 200 concurrent requests for 2 simulated 24 GiB GPUs.

Every request is answered (201 or 408), no device is ever promised more VRAM than it has
(checked on the client side, from grants and releases, and on the node's ledger, sampled
throughout), and everything is given back at the end: the ledger is empty, and once ended
leases have lingered the lease table is back to idle.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx

from gpulane.node import Node
from gpulane.scheduling.leases import FINAL_KEPT, FINAL_LINGER_S

REQUESTS = 200
TOTAL_MB = 24 * 1024


async def test_lease_storm(node: Node, live_url: str) -> None:
    rng = random.Random(1234)
    sizes = [rng.randint(4096, 12288) for _ in range(REQUESTS)]
    held_mb: dict[int, int] = {0: 0, 1: 0}  # client view: granted and not yet released
    peak_mb: dict[int, int] = {0: 0, 1: 0}
    violations: list[str] = []
    statuses: Counter[int] = Counter()
    tokens: set[int] = set()

    async def one(i: int, http: httpx.AsyncClient) -> None:
        r = await http.post("/v1/leases", json={"holder": f"storm-{i}", "vram_mb": sizes[i],
                                                "wait_s": 10, "ttl_s": 30})
        statuses[r.status_code] += 1
        if r.status_code != 201:
            assert r.status_code == 408, r.text
            return
        lease = r.json()
        assert lease["state"] == "granted" and lease["vram_mb"] == sizes[i]
        assert lease["token"] not in tokens, "a token was granted twice"
        tokens.add(lease["token"])
        device = lease["device"]
        held_mb[device] += sizes[i]
        peak_mb[device] = max(peak_mb[device], held_mb[device])
        if held_mb[device] > TOTAL_MB:
            violations.append(f"device {device} promised {held_mb[device]} MB")
        await asyncio.sleep(0.01)  # the "work"
        # Count it as given back before asking: the node can hand this room to someone else
        # only once it has seen the DELETE, which is after this line.
        held_mb[device] -= sizes[i]
        gone = await http.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
        assert gone.status_code == 200 and gone.json()["state"] == "released", gone.text

    ledger_peak = 0
    sampling = True

    async def sample_ledger() -> None:
        nonlocal ledger_peak
        while sampling:
            for acct in node.ledger.gpus.values():
                declared = acct.declared_mb
                ledger_peak = max(ledger_peak, declared)
                if declared > acct.total_vram_mb:
                    violations.append(f"ledger: device {acct.index} at {declared} MB")
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample_ledger())
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=live_url, timeout=30, limits=limits) as http:
        await asyncio.wait_for(asyncio.gather(*(one(i, http) for i in range(REQUESTS))), 60)
    sampling = False
    await sampler

    assert sum(statuses.values()) == REQUESTS, statuses
    assert set(statuses) <= {201, 408}, statuses
    assert statuses[201] > 0, statuses
    assert not violations, violations[:5]
    assert max(peak_mb.values()) <= TOTAL_MB and ledger_peak <= TOTAL_MB
    for acct in node.ledger.gpus.values():
        assert acct.declared_mb <= acct.total_vram_mb
        assert not acct.holdings, f"device {acct.index} still held: {acct.holdings}"
    assert node.leases.active() == []
    assert held_mb == {0: 0, 1: 0}
    # Ended leases linger a while for their holders' reads, then the table is back to idle.
    table = node.leases.table_size()
    assert table["waiting"] == table["holding"] == 0 and table["ended"] <= FINAL_KEPT
    node.leases.clock = lambda: time.time() + FINAL_LINGER_S
    node.leases.expire_now()
    assert node.leases.table_size() == {"waiting": 0, "holding": 0, "ended": 0, "notifier": 0}
