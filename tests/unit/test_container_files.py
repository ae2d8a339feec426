"""The Dockerfile and examples/compose.yaml, read as files (no Docker engine runs here): the
image runs as a non-root user, checks /readyz, exposes the API's port, holds no secret and
serves on 0.0.0.0 with keys required; compose runs Redis and two nodes on it with GPUs, a
healthy Redis first, distinct names and ports, and one shared uploads volume."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpulane.cli.server import bind_refusal
from gpulane.config import DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]
SECRETS = re.compile(r"(?i)(password|secret|token|api[_-]?key)\s*[=:]\s*\S+|[0-9a-f]{32,}")
"""What a secret baked into a file looks like: an assignment of one, or a long hex string."""


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        lines.append((keyword.upper(), args.strip()))
    return lines


def only(keyword: str) -> str:
    found = [args for kw, args in instructions() if kw == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def env() -> dict[str, str]:
    pairs: dict[str, str] = {}
    for kw, args in instructions():
        if kw == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                pairs[key] = value
    return pairs


def test_the_image_runs_as_a_user_that_is_not_root() -> None:
    user = only("USER")
    assert user.split(":")[0] not in ("root", "0")
    # The user is made in the image, with that uid, and owns the data dir.
    run = " ".join(args for kw, args in instructions() if kw == "RUN")
    assert f"--uid {user}" in run and "chown" in run and "/var/lib/gpulane" in run
    # USER comes after the last RUN: nothing after it runs as root.
    keywords = [kw for kw, _ in instructions()]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")


def test_the_image_is_slim_and_installs_the_package_without_dev_extras() -> None:
    assert re.fullmatch(r"python:3\.11-slim(@sha256:[0-9a-f]+)?", only("FROM"))
    run = " ".join(args for kw, args in instructions() if kw == "RUN")
    assert "pip install ." in run and "[dev" not in run
    copies = [args for kw, args in instructions() if kw == "COPY"]
    assert any("examples/presets" in c for c in copies)
    assert env()["GPULANE_EXAMPLES_DIR"] == "/opt/gpulane/examples/presets"


def test_the_healthcheck_asks_readyz_on_the_exposed_port() -> None:
    assert only("EXPOSE") == str(DEFAULT_PORT) == env()["GPULANE_PORT"]
    check = only("HEALTHCHECK")
    assert "--interval=" in check and "--timeout=" in check
    command = json.loads(check.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "/readyz" in command[2] and "127.0.0.1" in command[2]
    compile(command[2], "healthcheck", "exec")  # the one-liner is Python


def test_the_node_serves_on_all_addresses_with_keys_required() -> None:
    entry, cmd = json.loads(only("ENTRYPOINT")), json.loads(only("CMD"))
    argv = entry + cmd
    assert argv[:2] == ["gpulane", "serve"] and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "--insecure-no-auth" not in argv and "GPULANE_INSECURE_NO_AUTH" not in env()
    # So the node refuses to start until it is given keys, as the image's comment says.
    assert bind_refusal("0.0.0.0", False, None) is not None
    assert "GPULANE_KEYS" in (ROOT / "Dockerfile").read_text()
    assert not {"GPULANE_KEYS", "GPULANE_TOKEN", "GPULANE_KEYS_FILE"} & set(env())
    assert json.loads(only("VOLUME")) == [env()["GPULANE_DATA_DIR"]]


@pytest.mark.parametrize("name", ["Dockerfile", "examples/compose.yaml", ".dockerignore"])
def test_no_secret_is_written_in_the_container_files(name: str) -> None:
    for number, line in enumerate((ROOT / name).read_text().splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        assert not SECRETS.search(line), f"{name}:{number}: {line}"


def test_the_build_context_leaves_out_what_the_image_does_not_need() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "**/keys.yaml"} <= ignored
    assert not ignored & {"src", "examples", "pyproject.toml", "README.md"}


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "examples" / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def nodes(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in data["services"].items() if name != "redis"}


def test_compose_runs_redis_and_two_nodes_on_it() -> None:
    data = compose()
    assert set(data["services"]) == {"redis", "gpu-a", "gpu-b"}
    redis = data["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "noeviction" in redis["command"]  # docs/fleet.md: an evicting Redis loses tasks
    for name, svc in nodes(data).items():
        assert svc["build"]["context"] == ".." and svc["build"]["dockerfile"] == "Dockerfile"
        assert (ROOT / "examples" / svc["build"]["context"] / "Dockerfile").is_file()
        assert svc["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
        assert svc["environment"]["GPULANE_STORE"] == "redis://redis:6379/0"
        assert svc["init"] is True


def test_compose_nodes_have_distinct_names_ports_urls_and_data() -> None:
    services = nodes(compose())
    names = {svc["environment"]["GPULANE_NODE_NAME"] for svc in services.values()}
    assert names == set(services)
    host_ports = []
    for svc in services.values():
        (mapping,) = svc["ports"]
        host, container = mapping.split(":")
        assert container == str(DEFAULT_PORT)
        assert svc["environment"]["GPULANE_ADVERTISE_URL"] == f"http://localhost:{host}"
        host_ports.append(host)
    assert len(set(host_ports)) == 2
    data_volumes = [next(v for v in svc["volumes"] if v.endswith(":/var/lib/gpulane"))
                    for svc in services.values()]
    assert len(set(data_volumes)) == 2  # each node owns its data dir


def test_compose_nodes_share_one_uploads_volume_at_one_path() -> None:
    data = compose()
    mounts = set()
    for svc in nodes(data).values():
        files_dir = svc["environment"]["GPULANE_FILES_DIR"]
        mounts.add(next(v for v in svc["volumes"] if v.endswith(f":{files_dir}")))
    (mount,) = mounts  # the same volume on the same path in every node
    assert mount.split(":")[0] in data["volumes"]


def test_compose_nodes_ask_for_gpus_and_keys() -> None:
    gpus = []
    for svc in nodes(compose()).values():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        # Keys come from the environment of `docker compose`, required, never written here.
        assert re.fullmatch(r"\$\{GPULANE_KEYS:\?[^}]+\}", svc["environment"]["GPULANE_KEYS"])
    assert len(set(gpus)) == len(gpus) == 2  # one GPU each: two nodes never share one
