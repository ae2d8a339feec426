"""Server-side commands: ``gpulane serve`` and ``gpulane presets check``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from gpulane.errors import ConfigError, PresetError


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="settings file (default: ./gpulane.yaml if present)")
@click.option("--host", default=None, help="bind address [127.0.0.1]")
@click.option("--port", type=int, default=None, help="TCP port [8765]")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="database, locks and scratch files [./.gpulane]")
@click.option("--store", default=None, help="store URL [sqlite:///<data-dir>/gpulane.db]")
@click.option("--presets", "presets", multiple=True,
              help="preset file or folder, added to the examples (repeatable)")
@click.option("--no-examples", is_flag=True, default=None,
              help="do not load examples/presets")
@click.option("--simulate-gpus", default=None, metavar="SPEC",
              help="simulated GPUs, e.g. 2x24GiB; none = CPU only [NVML, else 2x24GiB]")
@click.option("--cpu-concurrency", type=int, default=None, help="CPU slots [cores]")
@click.option("--token", default=None, envvar="GPULANE_TOKEN",
              help="require this bearer token on /v1 (env GPULANE_TOKEN)")
@click.option("--log-level", default=None, help="debug, info, warning [info]")
def serve(config_file: str | None, host: str | None, port: int | None,
          data_dir: Path | None, store: str | None, presets: tuple[str, ...],
          no_examples: bool | None, simulate_gpus: str | None, cpu_concurrency: int | None,
          token: str | None, log_level: str | None) -> None:
    """Start a node: API, scheduler and workers for this host's devices."""
    import uvicorn

    from gpulane.api.app import create_app
    from gpulane.config import Settings
    from gpulane.node import Node

    try:
        settings = Settings.load(
            config_file, host=host, port=port, data_dir=data_dir, store=store,
            presets=list(presets) or None, examples=False if no_examples else None,
            simulate_gpus=simulate_gpus, cpu_concurrency=cpu_concurrency, token=token,
            log_level=log_level)
        node = Node(settings)
        # Own the data dir before uvicorn starts, so a refusal is one clear line.
        node.lock()
    except (ConfigError, PresetError) as exc:
        click.echo(f"gpulane serve: {exc}", err=True)
        sys.exit(2)
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(node)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), access_log=False,
                            lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(1)


@click.group()
def presets() -> None:
    """Work with preset registry files."""


@presets.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def presets_check(files: tuple[Path, ...]) -> None:
    """Validate preset files; report every problem with FILE:LINE and the fix."""
    from gpulane.presets import check_file, load_file

    problems: list[str] = []
    count = 0
    for f in files:
        targets = sorted([*f.glob("*.yaml"), *f.glob("*.yml")]) if f.is_dir() else [f]
        for t in targets:
            found = check_file(t)
            problems.extend(found)
            if not found:
                count += len(load_file(t))
    if problems:
        for p in problems:
            click.echo(p, err=True)
        click.echo(f"{len(problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo(f"ok: {count} preset(s) valid")


def register(group: click.Group) -> None:
    group.add_command(serve)
    group.add_command(presets)
