"""The gcn-train preset (issue 16) through a running node: a GCN from torch_geometric trained
on Zachary's karate club, a progress event per epoch, its accuracy in the output, and a
bad_input naming the field for each bad parameter.

It runs on a simulated GPU, so it computes on the CPU (``device`` says so).
"""

from __future__ import annotations

import math

import httpx
import pytest

from tests.integration.conftest import submit, wait_done
from tests.integration.test_model_presets import bulk, events


async def test_gcn_train_reports_every_epoch_and_its_accuracy(api: httpx.AsyncClient) -> None:
    pytest.importorskip("torch_geometric", reason="gcn-train needs the models extra "
                                                  "(torch_geometric): make install")
    task = await submit(api, "gcn-train", {"epochs": 5, "hidden": 8, "seed": 1})
    done = await wait_done(api, task["id"], wait=180)
    assert done["state"] == "succeeded", done
    out = done["output"]
    assert out["device"] == "cpu" and out["epochs"] == 5
    assert out["graph"] == {"name": "karate_club", "nodes": 34, "edges": 156, "classes": 4,
                            "labelled": 4}
    assert 0 <= out["train_accuracy"] <= 1 and 0 <= out["accuracy"] <= 1
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert len(out["predictions"]) == 34 and set(out["predictions"]) <= {0, 1, 2, 3}
    progress = [d for name, d in await events(api, task["id"]) if name == "progress"]
    assert [p["done"] for p in progress] == [1, 2, 3, 4, 5]
    assert all(p["total"] == 5 and math.isfinite(p["loss"]) for p in progress)
    # The last epoch's figures are the output's: the loss of its step, the accuracy after it.
    assert progress[-1]["loss"] == out["loss"]
    assert progress[-1]["accuracy"] == out["accuracy"]
    # Adam on 4 labels: the loss falls from the first epoch to the last.
    assert progress[-1]["loss"] < progress[0]["loss"]


async def test_gcn_train_bad_input_names_the_field(api: httpx.AsyncClient) -> None:
    # Checked before torch is imported: each fails at once, whatever is installed.
    cases = [({"epochs": 0}, "input.epochs"), ({"epochs": 10**9}, "input.epochs"),
             ({"epochs": 2.5}, "input.epochs"), ({"hidden": 0}, "input.hidden"),
             ({"hidden": 4096}, "input.hidden"), ({"learning_rate": 0}, "input.learning_rate"),
             ({"learning_rate": "fast"}, "input.learning_rate"),
             ({"dropout": 1}, "input.dropout"), ({"seed": True}, "input.seed"),
             ({"epoch": 3}, "'epoch'"), (["epochs"], "input must be an object")]
    ids = await bulk(api, "gcn-train", [inp for inp, _ in cases])
    for task_id, (inp, field) in zip(ids, cases, strict=True):
        bad = await wait_done(api, task_id, wait=60)
        assert bad["state"] == "failed" and bad["error"]["kind"] == "bad_input", (inp, bad)
        assert field in bad["error"]["message"], (inp, bad)
