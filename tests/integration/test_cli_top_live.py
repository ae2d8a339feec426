"""`gpulane top --once` against a real node served by uvicorn: its worker, its lease and the
VRAM they hold show in the frame, read through the SDK (Client.leases included)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from click.testing import CliRunner

from gpulane.cli import main
from gpulane.client import AsyncClient
from tests.integration.conftest import submit, wait_done


async def test_top_once_shows_a_live_nodes_worker_and_lease(
        api: httpx.AsyncClient, live_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPULANE_TOKEN", raising=False)
    done = await wait_done(api, (await submit(api, "sleep", {"ms": 1}, device="gpu"))["id"])
    assert done["state"] == "succeeded"
    granted = await api.post("/v1/leases", json={"vram": "3GiB", "holder": "trainer",
                                                  "ttl_s": 60})
    assert granted.status_code in (200, 201), granted.text
    async with AsyncClient(live_url) as sdk:
        (lease,) = (await sdk.leases())["leases"]
    assert lease["holder"] == "trainer" and "token" not in lease

    res = await asyncio.to_thread(CliRunner().invoke, main,
                                  ["top", "--once", "--url", live_url],
                                  env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "leases (1 held, 0 waiting)" in res.stdout
    assert any(line.startswith(lease["id"]) and "trainer" in line and "3,072" in line
               for line in lines)
    worker = next(line for line in lines if line.startswith("sleep-"))
    assert "gpu:" in worker and "sleep" in worker
    gpu = next(line for line in lines if line.startswith(f"{lease['device']} "))
    assert "█" in gpu and "/24,576" in gpu
