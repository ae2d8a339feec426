"""`gpulane top --once` through one node of a two-node fleet: the nodes table names both, with
their advertised URLs, and a lease asked of the other node shows in the leases table."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gpulane.cli import main
from tests.cluster.conftest import running_cluster


def test_top_shows_every_node_of_the_fleet(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPULANE_TOKEN", raising=False)
    with running_cluster(tmp_path, 2) as cluster:
        n1, n2 = cluster["n1"], cluster["n2"]
        with n2.client() as http:
            lease = http.post("/v1/leases", json={"vram": "1GiB", "holder": "far-trainer",
                                                  "ttl_s": 60})
            assert lease.status_code in (200, 201), lease.text
        res = CliRunner().invoke(main, ["top", "--once", "--url", n1.url],
                                 env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "nodes (2)" in res.stdout
    for node in (n1, n2):
        row = next(line for line in lines if line.startswith(f"{node.name} "))
        assert node.url in row and "ready" in row and "24,576" in row
    assert any("far-trainer" in line and " n2 " in line for line in lines)
