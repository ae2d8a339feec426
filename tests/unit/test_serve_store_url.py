"""``gpulane serve --store unix://...`` is refused in one line naming the URLs it takes (the
redis store speaks TCP only), not after a PING of the socket that says it does not answer."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from gpulane.cli import main


def test_a_unix_socket_store_is_refused_as_unsupported(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["serve", "--store", f"unix://{tmp_path}/redis.sock",
                                    "--simulate-gpus", "1x24GiB", "--data-dir",
                                    str(tmp_path / "data")])
    assert res.exit_code == 2
    (line,) = res.stderr.strip().splitlines()
    assert "is not supported" in line and "redis://HOST:PORT/DB" in line
    assert "does not answer" not in line
