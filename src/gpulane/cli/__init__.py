"""The ``gpulane`` command line: one click group every command module adds its commands to.

One module per command group: :mod:`gpulane.cli.server` (``serve``, ``presets check``),
:mod:`gpulane.cli.client` (``run``, ``tasks``, ``gpus``) and :mod:`gpulane.cli.exec`
(``exec``: any command under a GPU lease).
"""

from __future__ import annotations

import click

from gpulane.cli import client, server
from gpulane.cli.exec import exec_cmd
from gpulane.cli.files import upload_cmd
from gpulane.cli.routes import routes_cmd
from gpulane.cli.top import top_cmd

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpulane", prog_name="gpulane")
def main() -> None:
    """gpulane: a safe, fast lane to the GPUs for every app on a machine."""


client.register(main)
server.register(main)
main.add_command(exec_cmd)
main.add_command(upload_cmd)
main.add_command(routes_cmd)
main.add_command(top_cmd)
