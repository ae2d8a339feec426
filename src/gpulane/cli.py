"""The ``gpulane`` command line: one click group every part adds its commands to.

Client commands (``run``, ``tasks``, ``gpus``) live in :mod:`gpulane.cli_client`; server
commands (``serve``, ``presets check``) get added to :data:`main` the same way.
"""

from __future__ import annotations

import click

from gpulane import cli_client, cli_exec, cli_server


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpulane", prog_name="gpulane")
def main() -> None:
    """gpulane: a safe, fast lane to the GPUs for every app on a machine."""


cli_client.register(main)
cli_server.register(main)
main.add_command(cli_exec.exec_cmd)

if __name__ == "__main__":
    main()
