"""examples/ml_service.py: XGBoost under a gpulane lease, and its CPU fallbacks.

The node has two simulated GPUs, so a granted lease is real but training runs on the CPU; the
example says so in its report.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from gpulane.client import Client
from gpulane.node import Node
from tests.conftest import eventually, free_port

pytest.importorskip("xgboost")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ml_service.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ml_service_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ml = load_example()
SMALL = ml.make_dataset(rows=2000)  # fast to train; still far better than chance


async def active_leases(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    leases: list[dict[str, Any]] = (await api.get("/v1/leases")).json()["leases"]
    return leases


async def test_trains_under_a_granted_lease_then_releases_it(live_url: str, node: Node,
                                                              api: httpx.AsyncClient) -> None:
    report = await asyncio.to_thread(ml.train, gpulane_url=live_url, rounds=20, data=SMALL,
                                     vram="1GiB")
    assert report["reason"] == "lease granted"
    assert report["device"] in ("cuda:0", "cuda:1")
    assert report["lease_id"].startswith("lease-")
    assert report["trained_on"] == "cpu" and "simulated" in report["note"]
    assert report["rounds"] == 20 and report["accuracy"] > 0.7 and report["seconds"] > 0
    assert node.leases.get(report["lease_id"]).state.value == "released"
    assert await active_leases(api) == []
    assert sum(a.declared_mb for a in node.ledger.gpus.values()) == 0


@pytest.fixture
def client_stats(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The stats of every Client the example closes (calls, attempts, retries), in order."""
    closed: list[dict[str, Any]] = []

    class RecordingClient(Client):
        def close(self) -> None:
            closed.append(self.stats())
            super().close()

    monkeypatch.setattr(ml, "Client", RecordingClient)
    return closed


async def test_falls_back_to_the_cpu_when_gpulane_is_unreachable(
        client_stats: list[dict[str, Any]]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    report = await asyncio.to_thread(ml.train, gpulane_url=closed, rounds=10, data=SMALL)
    assert report["device"] == "cpu" and report["trained_on"] == "cpu"
    assert report["reason"].startswith("gpulane unreachable: ")
    assert "Connect" in report["reason"] or "circuit breaker" in report["reason"]
    assert report["lease_id"] is None and report["accuracy"] > 0.7
    # Seconds, not minutes: one try (none when the breaker refused it), no retries to wait out.
    [stats] = client_stats
    assert stats["calls"] == 1 and stats["attempts"] <= 1 and stats["retries"] == 0


async def test_falls_back_to_the_cpu_when_the_lease_wait_times_out(
        live_url: str, api: httpx.AsyncClient, client_stats: list[dict[str, Any]]) -> None:
    hog = (await api.post("/v1/leases", json={
        "holder": "hog", "gpus": 2, "priority": "immediate", "preemptible": False,
        "ttl_s": 60})).json()
    assert hog["state"] == "granted"
    report = await asyncio.to_thread(ml.train, gpulane_url=live_url, rounds=10, data=SMALL,
                                     wait_s=0.3)
    assert report["device"] == "cpu" and report["lease_id"] is None
    assert report["reason"].startswith("lease wait timed out: ")
    assert "wait_s=0.3" in report["reason"]  # the server waited the example's wait_s
    # ... and answered once: a lease wait that timed out is an answer, not retried.
    [stats] = client_stats
    assert stats["calls"] == 1 and stats["attempts"] == 1 and stats["retries"] == 0
    assert [lz["holder"] for lz in await active_leases(api)] == ["hog"]
    await api.delete(f"/v1/leases/{hog['id']}", params={"token": hog["token"]})


async def test_a_preempted_lease_lets_go_and_the_cpu_finishes(
        live_url: str, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fit = ml.fit
    urgent: dict[str, Any] = {}

    def fit_preempted_first(data: Any, params: Any, rounds: int, device: str,
                            **kw: Any) -> Any:
        """Under the lease: have an urgent job take the GPUs, wait for the preempt to be
        seen, then train (which stops after one round)."""
        if kw.get("start") is None:
            def take() -> None:
                urgent["response"] = httpx.post(f"{live_url}/v1/leases", json={
                    "holder": "urgent", "gpus": 2, "priority": "immediate", "wait_s": 20},
                    timeout=30)
            threading.Thread(target=take, daemon=True).start()
            deadline = time.monotonic() + 10
            while not kw["should_stop"]() and time.monotonic() < deadline:
                time.sleep(0.02)
        return real_fit(data, params, rounds, device, **kw)

    monkeypatch.setattr(ml, "fit", fit_preempted_first)
    report = await asyncio.to_thread(ml.train, gpulane_url=live_url, rounds=30, data=SMALL,
                                     grace_s=3)
    assert report["reason"].startswith("lease preempted: ")
    assert report["rounds"] == 30 and report["accuracy"] > 0.7
    assert node.leases.get(report["lease_id"]).state.value == "released"

    async def granted() -> bool:
        return "response" in urgent
    await eventually(granted)
    assert urgent["response"].status_code == 201
