"""``gpulane serve`` refuses a node name that a live node of the fleet holds (two live nodes of
one name overwrite each other's registration, and the first to stop leaves the other taken
for dead), waits out the registration a killed run left, and refuses a name that is not a
host name's letters."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from click.testing import CliRunner

from gpulane.cli import main
from gpulane.cli.serving import _name_taken, name_refusal
from gpulane.fleet import NodeInfo
from gpulane.fleet.redis import RedisFleet


def info(name: str, started_at: float) -> NodeInfo:
    return NodeInfo(name=name, url="http://127.0.0.1:18801", started_at=started_at,
                    heartbeat_at=time.time())


async def test_a_live_name_is_refused(redis_url: str) -> None:
    live = RedisFleet(redis_url, "a")
    started = time.time()
    await live.register(info("a", started), ttl_s=5)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(0.1)
            await live.register(info("a", started), ttl_s=5)
    beating = asyncio.create_task(heartbeat())
    try:
        why = await _name_taken(redis_url, "a", wait_s=10)
        assert why is not None and "--node-name 'a' is taken" in why
        assert "http://127.0.0.1:18801" in why and "another --node-name" in why
        assert await _name_taken(redis_url, "b", wait_s=10) is None
    finally:
        beating.cancel()
        await live.close()


async def test_a_killed_runs_registration_is_waited_out(redis_url: str) -> None:
    dead = RedisFleet(redis_url, "a")
    await dead.register(info("a", time.time()), ttl_s=0.5)  # then no heartbeat: killed
    await dead.close()
    assert await _name_taken(redis_url, "a", wait_s=10) is None


def test_an_odd_name_is_refused_before_redis_is_asked() -> None:
    why = name_refusal("redis://127.0.0.1:1/0", "a b/*", ttl_s=5)
    assert why is not None and "--node-name 'a b/*' is not a node name" in why
    assert name_refusal("sqlite:///x.db", "a b", ttl_s=5) is None  # no fleet: any name


def test_serve_exits_2_with_one_line(redis_url: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["serve", "--store", redis_url, "--node-name", "bad:name",
                                    "--simulate-gpus", "1x24GiB", "--data-dir",
                                    str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "gpulane serve: --node-name 'bad:name' is not a node name: use 1 to 63 letters, "
        "digits, '.', '_' or '-', starting with a letter or digit (e.g. gpu-host-1)"]


async def test_a_registration_that_outlasts_the_wait_is_named_as_such(redis_url: str) -> None:
    stale = RedisFleet(redis_url, "a")
    await stale.register(info("a", time.time()), ttl_s=60)  # a killed node's, long TTL
    await stale.close()
    why = await _name_taken(redis_url, "a", wait_s=0.3)
    assert why is not None and "still registered after 0.3 s without a new heartbeat" in why
