"""bench/engines.py's figures: medians, speedups, the table, and how it reads a node's GPUs."""

from __future__ import annotations

from typing import Any

import httpx
from bench import engines


def test_speedup_is_cpu_over_gpu_seconds_for_training_and_gpu_over_cpu_rate_for_serving() -> None:
    train = {"cpu": engines.summary("xgboost", [{"seconds": 9.0}, {"seconds": 6.0},
                                               {"seconds": 7.0}]),
             "gpu": engines.summary("xgboost", [{"seconds": 1.0}, {"seconds": 2.0}])}
    assert train["cpu"]["seconds"] == 7.0 and train["cpu"]["min_max"] == [6.0, 9.0]
    assert engines.speedup("xgboost", train) == round(7.0 / 1.5, 2)
    serve = {"cpu": engines.summary("matmul", [{"items_per_s": 100.0}]),
             "gpu": engines.summary("matmul", [{"items_per_s": 900.0}])}
    assert engines.speedup("matmul", serve) == 9.0
    assert engines.speedup("ctgan", {"cpu": train["cpu"], "gpu": {"skipped": "no GPU"}}) is None


def test_the_table_sets_each_lane_beside_the_authors_figure() -> None:
    results = {"ctgan": {"cpu": engines.summary("ctgan", [{"seconds": 8.0}]),
                         "gpu": {"skipped": "no GPU: none here"}},
               "embed": {"cpu": engines.summary("embed", [{"items_per_s": 1500.0}]),
                         "gpu": engines.summary("embed", [{"items_per_s": 3000.0}])}}
    _, rows = engines.table(results)
    assert rows[0] == ["ctgan", "ctgan-train", "8.00 s (8.00-8.00)", "skipped", "-", "2-3x"]
    assert rows[1] == ["embed", "embed", "1,500/s (1,500-1,500)", "3,000/s (3,000-3,000)",
                       "2.00x", "-"]


def test_session_inputs_hold_the_rows_asked_for() -> None:
    texts = engines.session_inputs("embed", 70)
    assert [len(t["texts"]) for t in texts] == [32, 32, 6]
    assert engines.session_inputs("matmul-onnx", 3) == [{"seed": 0}, {"seed": 1}, {"seed": 2}]


def gpus_api(view: dict[str, Any]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200, json=view)),
                        base_url="http://node")


def test_a_node_without_a_real_gpu_has_no_gpu_lane() -> None:
    why, seen = engines.node_gpus(gpus_api({"provider": "simulated", "simulated": True,
                                            "reason": "no NVML", "devices": [{"index": 0}]}))
    assert "no GPU" in why and "simulated" in why and seen["simulated"] is True
    why, _ = engines.node_gpus(gpus_api({"provider": "nvml", "simulated": False,
                                         "reason": None, "devices": []}))
    assert why
    why, seen = engines.node_gpus(gpus_api({"provider": "amdsmi", "simulated": False,
                                            "devices": [{"index": 0, "name": "MI300X"}]}))
    assert why == "" and seen["devices"][0]["name"] == "MI300X"
