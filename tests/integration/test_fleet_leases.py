"""Leases across a fleet: in-process nodes a, b and c on one redis-server, each driven through
its own app. A lease on b's GPU asked through a, preempted through a while its holder follows
it through c, taken back by a restarted b, ended by b's loss and by b's drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpulane.api.app import create_app
from gpulane.client import AsyncClient
from gpulane.node import Node
from tests.conftest import eventually
from tests.integration.conftest import make_settings, serve_live, stop_node

pytestmark = pytest.mark.usefixtures("redis_server")

Fleet = dict[str, tuple[Node, httpx.AsyncClient]]


def _node(tmp_path: Path, redis_url: str, name: str, **settings: Any) -> Node:
    return Node(make_settings(tmp_path / name, store=redis_url, node_name=name,
                              simulate_gpus="2x24GiB", **settings))


@contextlib.asynccontextmanager
async def fleet_of(tmp_path: Path, redis_url: str, *names: str,
                   **settings: Any) -> AsyncIterator[Fleet]:
    """Started nodes sharing ``redis_url``, each with an in-process client of its app."""
    out: Fleet = {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            for name in names:
                n = _node(tmp_path, redis_url, name, **settings)
                await n.start()
                stack.push_async_callback(stop_node, n)
                api = await stack.enter_async_context(httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=create_app(n, manage_node=False)),
                    base_url=f"http://{name}", timeout=30))
                out[name] = (n, api)
            yield out
    finally:
        out.clear()


async def _lease(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await api.post("/v1/leases", json={"holder": "svc", **body})
    assert r.status_code == 201, r.text
    lease: dict[str, Any] = r.json()
    return lease


async def test_a_lease_on_b_asked_through_a(tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        (node_a, a), (node_b, b) = fleet["a"], fleet["b"]
        lease = await _lease(a, vram_mb=2048, node="b", ttl_s=30)
        assert lease["node"] == "b" and lease["device"] in (0, 1) and lease["token"]
        assert node_b.ledger.gpus[lease["device"]].declared_mb == 2048
        assert sum(g.declared_mb for g in node_a.ledger.gpus.values()) == 0
        gpus = (await b.get("/v1/gpus")).json()
        holders = [h["holder"] for d in gpus["devices"] for h in d.get("holders", [])]
        assert lease["id"] in holders, gpus
        seen = (await a.get(f"/v1/leases/{lease['id']}")).json()
        assert seen["node"] == "b" and seen["state"] == "granted" and "token" not in seen
        listed = (await a.get("/v1/leases")).json()["leases"]
        assert [x["id"] for x in listed] == [lease["id"]] and "token" not in listed[0]
        renewed = await a.post(f"/v1/leases/{lease['id']}/renew", json={"token": lease["token"]})
        assert renewed.status_code == 200 and renewed.json()["expires_at"] >= lease["expires_at"]
        stale = await a.post(f"/v1/leases/{lease['id']}/renew", json={"token": 1})
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_token"
        gone = await a.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
        assert gone.status_code == 200 and gone.json()["state"] == "released"
        assert node_b.ledger.gpus[lease["device"]].declared_mb == 0
        assert (await b.get(f"/v1/leases/{lease['id']}")).json()["state"] == "released"


async def test_an_unnamed_request_goes_where_there_is_room(tmp_path: Path,
                                                           redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        a = fleet["a"][1]
        here = await _lease(a, gpus=2)
        assert here["node"] == "a"  # this node first when it has room
        there = await _lease(a, vram_mb=4096)
        assert there["node"] == "b"  # a is full, b has room now
        for lz in (here, there):
            r = await a.delete(f"/v1/leases/{lz['id']}", params={"token": lz["token"]})
            assert r.json()["state"] == "released"


async def test_unknown_node_and_lease_name_the_field(tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        a = fleet["a"][1]
        r = await a.post("/v1/leases", json={"holder": "svc", "vram_mb": 1, "node": "zz"})
        assert r.status_code == 404 and r.json()["error"]["field"] == "node"
        r = await a.post("/v1/leases", json={"holder": "svc", "vram_mb": 1, "node": ""})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_node", r.text
        r = await a.get("/v1/leases/lease-nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_lease"
        r = await a.post("/v1/leases", json={"holder": "svc", "vram_mb": 10**6})
        assert r.status_code == 400 and r.json()["error"]["field"] == "vram_mb"


async def test_preemption_across_nodes(tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b", "c") as fleet:
        a, c = fleet["a"][1], fleet["c"][1]
        bg = await _lease(c, gpus=2, node="b", priority="background", grace_s=10)
        assert bg["node"] == "b"
        events: list[str] = []

        async def follow() -> None:
            async with serve_live(fleet["c"][0]) as url, \
                    httpx.AsyncClient(base_url=url, timeout=30) as http, \
                    http.stream("GET", f"/v1/leases/{bg['id']}/events") as r:
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        events.append(line[7:])
        follower = asyncio.create_task(follow())
        urgent_req = asyncio.create_task(a.post("/v1/leases", json={
            "holder": "urgent", "vram_mb": 1024, "node": "b", "priority": "immediate",
            "wait_s": 20}))

        async def preempted() -> bool:
            return "preempt" in events
        await eventually(preempted, timeout=10)
        gone = await c.delete(f"/v1/leases/{bg['id']}", params={"token": bg["token"]})
        assert gone.json()["state"] == "released"
        r = await urgent_req
        assert r.status_code == 201, r.text
        urgent = r.json()
        assert urgent["node"] == "b" and urgent["state"] == "granted"
        await a.delete(f"/v1/leases/{urgent['id']}", params={"token": urgent["token"]})
        # The stream ends by itself once the resume has reached the holder.
        await asyncio.wait_for(follower, 10)
        assert events[-2:] == ["released", "resume"] and events[0] == "waiting", events


async def test_a_restarted_node_keeps_its_held_lease(tmp_path: Path, redis_url: str) -> None:
    # A node TTL longer than the test: a does not take b for dead while b restarts.
    async with fleet_of(tmp_path, redis_url, "a", "b", node_ttl_s=60) as fleet:
        a, (node_b, _) = fleet["a"][1], fleet["b"]
        lease = await _lease(a, vram_mb=3072, node="b", ttl_s=60)
        waiter = asyncio.create_task(a.post("/v1/leases", json={
            "holder": "late", "gpus": 2, "node": "b", "wait_s": 30}))

        async def waiting() -> bool:
            return len(node_b.leases.active()) == 2
        await eventually(waiting)
        await stop_node(node_b)
        r = await waiter  # a stopping node refuses what waits: its caller hears it now
        assert r.status_code == 503 and r.json()["error"]["code"] == "lease_ended", r.text
        again = _node(tmp_path, redis_url, "b", node_ttl_s=60)
        await again.start()
        try:
            held = again.leases.get(lease["id"])
            assert held.state.value == "granted" and held.token == lease["token"]
            assert held.expires_at == lease["expires_at"]
            assert again.ledger.gpus[lease["device"]].declared_mb == 3072
            r = await a.post(f"/v1/leases/{lease['id']}/renew", json={"token": lease["token"]})
            assert r.status_code == 200 and r.json()["state"] == "granted", r.text
            listed = [(x["holder"], x["state"]) for x in
                      (await a.get("/v1/leases")).json()["leases"]]
            assert listed == [("svc", "granted")]
            r = await a.delete(f"/v1/leases/{lease['id']}", params={"token": lease["token"]})
            assert r.json()["state"] == "released"
        finally:
            await stop_node(again)


async def test_a_dead_nodes_leases_end_expired(tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        (node_a, a), (node_b, _) = fleet["a"], fleet["b"]
        lease = await _lease(a, vram_mb=1024, node="b", ttl_s=60)
        await stop_node(node_b)  # it never comes back
        await node_a.fleet_leases.on_node_dead("b")
        seen = (await a.get(f"/v1/leases/{lease['id']}")).json()
        assert seen["state"] == "expired"
        events = await node_a.fleet.lease_events(lease["id"])
        assert events[-1]["event"] == "expired"
        assert events[-1]["data"]["reason"] == "node_lost"
        assert (await a.get("/v1/leases")).json()["leases"] == []


async def test_a_drain_ends_every_lease_of_the_node(tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        (node_b, _), a = fleet["b"], fleet["a"][1]
        held = await _lease(a, gpus=2, node="b")
        waiter = asyncio.create_task(a.post("/v1/leases", json={
            "holder": "late", "vram_mb": 1024, "node": "b", "wait_s": 30}))

        async def waiting() -> bool:
            return len(node_b.leases.active()) == 2
        await eventually(waiting)
        assert await node_b.fleet_leases.release_all("node b drains") == 2
        r = await waiter
        assert r.status_code == 503 and r.json()["error"]["code"] == "lease_ended", r.text
        seen = (await a.get(f"/v1/leases/{held['id']}")).json()
        assert seen["state"] == "revoked"
        events = await fleet["a"][0].fleet.lease_events(held["id"])
        assert events[-1]["data"]["reason"] == "node b drains"


async def test_the_sdk_holds_a_lease_on_another_node(tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        (node_a, _), (node_b, _) = fleet["a"], fleet["b"]
        async with serve_live(node_a) as url, AsyncClient(url) as client:
            async with client.gpu(vram=1024, node="b", ttl_s=1) as lease:
                assert lease.lease["node"] == "b"

                async def renewed() -> bool:  # past its TTL, kept by renewals through a
                    held = node_b.leases.get(lease.lease["id"])
                    return bool(held.expires_at and held.granted_at
                                and held.expires_at > held.granted_at + 1.5)
                await eventually(renewed)
            assert node_b.leases.get(lease.lease["id"]).state.value == "released"


async def test_a_draining_node_grants_no_new_lease(tmp_path: Path, redis_url: str) -> None:
    async with fleet_of(tmp_path, redis_url, "a", "b") as fleet:
        (node_a, a) = fleet["a"]
        node_a.drains.start()
        elsewhere = await _lease(a, vram_mb=1024)
        assert elsewhere["node"] == "b"  # a drains: the request goes to the other node
        r = await a.post("/v1/leases", json={"holder": "svc", "vram_mb": 1024, "node": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text
        assert r.headers["Retry-After"]
        node_a.drains.resume()
        assert (await _lease(a, vram_mb=1024))["node"] == "a"
