"""A node on AMD GPUs, read through a stand-in ``amdsmi`` (tests/unit/test_devices_amd.py): it
lists them, places a worker on one and the worker gets ROCm's variables, a CPU worker none of
its GPUs. No AMD hardware runs here; the worker computes nothing on the GPU it is given.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gpulane.api.app import create_app
from gpulane.devices import AmdProvider
from gpulane.node import Node
from tests.integration.conftest import make_settings, stop_node, submit, wait_done
from tests.unit.test_devices_amd import fake_amdsmi, install


async def test_a_node_on_amd_gpus_gives_its_workers_rocm_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_amdsmi(count=2, hip_ids=[1, 0]))
    provider = AmdProvider.try_create()
    assert provider is not None
    node = Node(make_settings(tmp_path, simulate_gpus=None, gpu_lock_dir=str(tmp_path / "locks")),
                provider=provider)
    await node.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=create_app(node, manage_node=False)), base_url="http://t") as api:
            gpus = (await api.get("/v1/gpus")).json()
            devices = gpus["devices"]
            assert [d["name"] for d in devices] == ["AMD Instinct MI300X"] * 2
            assert devices[0]["uuid"].startswith("AMD-GPU-") and not devices[0]["simulated"]
            assert devices[0]["uuid"].endswith("1")  # HIP's ordinal 0 is AMD SMI's second GPU

            done = await wait_done(api, (await submit(api, "behave", {"action": "env"},
                                                      device="gpu"))["id"])
            env, device = done["output"], done["placement"]["device"]
            assert done["state"] == "succeeded" and device.startswith("gpu:"), done
            assert env["ROCR_VISIBLE_DEVICES"] == device.split(":")[1]
            assert (env["HIP_VISIBLE_DEVICES"], env["CUDA_VISIBLE_DEVICES"],
                    env["GPU_DEVICE"]) == ("0", "0", "cuda:0")

            cpu = await wait_done(api, (await submit(api, "behave", {"action": "env"},
                                                     device="cpu"))["id"])
            assert cpu["placement"]["device"] == "cpu"
            assert (cpu["output"]["HIP_VISIBLE_DEVICES"], cpu["output"]["CUDA_VISIBLE_DEVICES"]
                    ) == ("-1", "")
            assert cpu["output"]["ROCR_VISIBLE_DEVICES"] is None
    finally:
        await stop_node(node)
