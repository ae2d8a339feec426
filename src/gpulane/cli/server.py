"""Server-side commands: ``gpulane serve``, ``gpulane presets check`` and ``gpulane keys``.

``gpulane serve`` drains on SIGTERM: it stops claiming, lets running work finish within
drain_grace_s, requeues the rest without spending attempts, releases its leases, leaves the
fleet and exits 0 (a second SIGTERM, or SIGINT, stops it at once: running work is requeued
all the same). A ``redis://`` store is checked before anything starts: a malformed URL or a
Redis that does not answer is one line naming --store and the fix, and exit code 2; so is a
--node-name that a live node of the fleet holds (one a killed run left lapses first).
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

import click

from gpulane.cli.keys import keys
from gpulane.errors import ConfigError, PresetError

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5
"""Once the server stops (after a drain to exit, or on Ctrl+C), how long answers still open may
run before they are cut: an event stream or a dashboard tab left open would otherwise hold
the process forever (clients resume with Last-Event-ID, the page reconnects)."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` is reachable from this machine only ('localhost' counts;
    any other name, '' and 0.0.0.0 do not)."""
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, keyed: bool, insecure_no_auth: bool) -> str | None:
    """Why a node must not listen on ``host`` (one line with the fix), or None."""
    if keyed or insecure_no_auth or is_loopback(host):
        return None
    return (f"refusing to listen on {host} without API keys: anyone who reaches it could run "
            "work on these GPUs; give --keys-file FILE or GPULANE_KEYS (make a key with "
            "'gpulane keys new NAME'), or --insecure-no-auth on a network you trust")


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="settings file (default: ./gpulane.yaml if present)")
@click.option("--host", default=None, help="bind address [127.0.0.1]")
@click.option("--port", type=int, default=None, help="TCP port [8765]")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="database, locks and scratch files [./.gpulane]")
@click.option("--store", default=None,
              help="store URL: sqlite:///PATH (one host) or redis://HOST:6379/0 (a fleet: "
                   "every node on one Redis) [sqlite:///<data-dir>/gpulane.db]")
@click.option("--node-name", default=None,
              help="this node's name in the fleet, unique per node [the host name]")
@click.option("--advertise-url", default=None, metavar="URL",
              help="this node's API as other hosts reach it, shown by 'gpulane nodes' "
                   "[http://HOST:PORT of its bind]")
@click.option("--presets", "presets", multiple=True,
              help="preset file or folder, added to the examples (repeatable)")
@click.option("--no-examples", is_flag=True, default=None,
              help="do not load examples/presets")
@click.option("--simulate-gpus", default=None, metavar="SPEC",
              help="simulated GPUs, e.g. 2x24GiB; none = CPU only [NVML, else 2x24GiB]")
@click.option("--cpu-concurrency", type=int, default=None, help="CPU slots [cores]")
@click.option("--token", default=None, envvar="GPULANE_TOKEN",
              help="one API key with every scope, named 'token' (env GPULANE_TOKEN)")
@click.option("--keys-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="API keys: names, SHA-256s, scopes (docs/security.md; env GPULANE_KEYS "
                   "for inline keys)")
@click.option("--insecure-no-auth", is_flag=True, default=None,
              help="listen on a non-loopback address without any key")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="an origin whose web pages may call the API (repeatable; CORS off if none)")
@click.option("--durability", type=click.Choice(["normal", "full"]), default=None,
              help="normal: a 202 survives a process crash; full: power loss too [normal]")
@click.option("--retain", default=None,
              help="keep finished tasks, events and files this long, e.g. 7d, 12h [7d]")
@click.option("--max-queued", type=int, default=None,
              help="queued tasks per preset before 429 queue_full [100000]")
@click.option("--allowed-root", "allowed_roots", multiple=True, metavar="DIR",
              help="a folder whose files task inputs may name by path (repeatable; env "
                   "GPULANE_ALLOWED_ROOTS; none: files only by upload)")
@click.option("--log-level", default=None, help="debug, info, warning [info]")
def serve(config_file: str | None, host: str | None, port: int | None,
          data_dir: Path | None, store: str | None, node_name: str | None,
          advertise_url: str | None, presets: tuple[str, ...],
          no_examples: bool | None, simulate_gpus: str | None, cpu_concurrency: int | None,
          token: str | None, keys_file: Path | None, insecure_no_auth: bool | None,
          cors_origins: tuple[str, ...], durability: str | None, retain: str | None,
          max_queued: int | None, allowed_roots: tuple[str, ...],
          log_level: str | None) -> None:
    """Start a node: API, scheduler and workers for this host's devices. SIGTERM drains it
    (running work finishes within drain_grace_s, the rest is requeued) and exits 0."""
    import uvicorn

    from gpulane.api.app import create_app
    from gpulane.api.keys import load_keys
    from gpulane.api.wire import OneWriteHttpTools
    from gpulane.cli.serving import DrainingServer, name_refusal, store_refusal
    from gpulane.config import Settings
    from gpulane.node import Node

    try:
        settings = Settings.load(
            config_file, host=host, port=port, data_dir=data_dir, store=store,
            node_name=node_name, advertise_url=advertise_url,
            presets=list(presets) or None, examples=False if no_examples else None,
            simulate_gpus=simulate_gpus, cpu_concurrency=cpu_concurrency, token=token,
            keys_file=keys_file, insecure_no_auth=insecure_no_auth,
            cors_origins=list(cors_origins) or None, durability=durability, retain=retain,
            max_queued=max_queued, allowed_roots=list(allowed_roots) or None,
            log_level=log_level)
        level = settings.log_level.upper()
        logging.basicConfig(level=level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        api_keys = load_keys(settings)
        refusal = bind_refusal(settings.host, bool(api_keys), settings.insecure_no_auth)
        if refusal is not None:
            raise ConfigError(refusal)
        refusal = (store_refusal(settings.store_url)
                   or name_refusal(settings.store_url, settings.node, settings.node_ttl_s))
        if refusal is not None:
            raise ConfigError(refusal)
        node = Node(settings)
        # Own the data dir before uvicorn starts, so a refusal is one clear line.
        node.lock()
    except (ConfigError, PresetError) as exc:
        click.echo(f"gpulane serve: {exc}", err=True)
        sys.exit(2)
    if not api_keys and not is_loopback(settings.host):
        log.warning("listening on %s with no API keys (--insecure-no-auth): anyone who "
                    "reaches it may use every route", settings.host)
    app = create_app(node, keys=api_keys)
    # Each answer's head and body in one write (api/wire.py); no "server: uvicorn" header.
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), access_log=False,
                            lifespan="on", timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                            http=OneWriteHttpTools, server_header=False)
    server = DrainingServer(config, node)
    server.run()
    if not server.started:
        sys.exit(1)


@click.group()
def presets() -> None:
    """Work with preset registry files."""


@presets.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--no-examples", is_flag=True,
              help="check routes without the examples (as serve --no-examples loads them)")
def presets_check(files: tuple[Path, ...], no_examples: bool) -> None:
    """Validate preset files; report every problem with FILE:LINE and the fix."""
    from gpulane.presets import check_file, load_file
    from gpulane.presets.loading import check_routes

    problems: list[str] = []
    count = 0
    checked: list[Path] = []
    for f in files:
        targets = sorted([*f.glob("*.yaml"), *f.glob("*.yml")]) if f.is_dir() else [f]
        for t in targets:
            found = check_file(t)
            problems.extend(found)
            if not found:
                count += len(load_file(t))
                checked.append(t)
    if not problems:  # routes name presets of other files (the examples' too): all at once
        problems = check_routes(checked, examples=not no_examples)
    if problems:
        for p in problems:
            click.echo(p, err=True)
        click.echo(f"{len(problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo(f"ok: {count} preset(s) valid")


def register(group: click.Group) -> None:
    group.add_command(serve)
    group.add_command(presets)
    group.add_command(keys)
