"""Issue 16's example presets through a running node: matmul-onnx (the matmul MLP on ONNX
Runtime) against the torch matmul preset, and ctgan-train (CTGAN on a scikit-learn dataset).

Both run on a simulated GPU, so they compute on the CPU.
"""

from __future__ import annotations

import math

import httpx
import pytest

from tests.integration.conftest import submit, wait_done
from tests.integration.test_model_presets import bulk, events


async def test_matmul_onnx_matches_the_torch_preset(api: httpx.AsyncClient) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter
    x = [math.cos(i / 7) for i in range(2048)]
    inputs = [{"seed": 1}, {"seed": 2}, {"x": x}]
    onnx_ids = await bulk(api, "matmul-onnx", [*inputs, {"x": [1.0]}])
    torch_ids = await bulk(api, "matmul", inputs)
    onnx = [await wait_done(api, i, wait=120) for i in onnx_ids]
    torch = [await wait_done(api, i, wait=60) for i in torch_ids]
    for got, want in zip(onnx[:3], torch, strict=True):
        assert got["state"] == "succeeded" and want["state"] == "succeeded", (got, want)
        assert got["output"]["provider"] == "CPUExecutionProvider"
        assert got["output"]["y0"] == pytest.approx(want["output"]["y0"], rel=1e-4, abs=1e-5)
        assert got["output"]["norm"] == pytest.approx(want["output"]["norm"], rel=1e-4)
    assert onnx[0]["output"]["norm"] != onnx[1]["output"]["norm"]
    assert onnx[3]["state"] == "failed" and onnx[3]["error"]["kind"] == "bad_input"
    assert "input.x" in onnx[3]["error"]["message"]


async def test_ctgan_train_reports_every_epoch_and_its_fidelity(api: httpx.AsyncClient) -> None:
    pytest.importorskip("ctgan")
    task = await submit(api, "ctgan-train", {"dataset": "iris", "epochs": 3, "batch_size": 100,
                                             "samples": 4})
    done = await wait_done(api, task["id"], wait=120)
    assert done["state"] == "succeeded", done
    out = done["output"]
    assert out["device"] == "cpu" and out["rows"] == 150 and out["epochs"] == 3
    assert out["columns"][-1] == "class" and len(out["samples"]) == 4
    species = {"setosa", "versicolor", "virginica"}
    assert all(set(row) == set(out["columns"]) and row["class"] in species
               for row in out["samples"])
    columns = out["fidelity"]["columns"]
    assert columns["class"]["kind"] == "categorical"
    assert all(c["kind"] == "numeric" for name, c in columns.items() if name != "class")
    assert all(0 <= c["score"] <= 1 for c in columns.values())
    mean = sum(c["score"] for c in columns.values()) / len(columns)
    assert out["fidelity"]["score"] == pytest.approx(mean, abs=1e-3)
    stored = await events(api, task["id"])
    assert not [d for name, d in stored if name == "warning"]  # every epoch was reported
    progress = [d for name, d in stored if name == "progress"]
    assert [p["done"] for p in progress] == [1, 2, 3]
    assert all(p["total"] == 3 and math.isfinite(p["generator"]) for p in progress)
    assert progress[-1]["generator"] == out["loss"]["generator"]


async def test_ctgan_train_bad_input_names_the_field(api: httpx.AsyncClient) -> None:
    cases = [({"epochs": 0}, "input.epochs"), ({"dataset": "mnist"}, "input.dataset"),
             ({"batch_size": 25}, "input.batch_size"), ({"rows": 3}, "input.rows"),
             ({"epoch": 3}, "epoch"), ({"seed": "0"}, "input.seed")]
    ids = await bulk(api, "ctgan-train", [inp for inp, _ in cases])
    for task_id, (inp, field) in zip(ids, cases, strict=True):
        bad = await wait_done(api, task_id, wait=60)
        assert bad["state"] == "failed" and bad["error"]["kind"] == "bad_input", (inp, bad)
        assert field in bad["error"]["message"], (inp, bad)
