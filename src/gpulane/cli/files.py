"""``gpulane upload FILE``: upload a file (streamed from disk) and print its id, which a task's
input names it by (``--input '{"file": "file-..."}'``)."""

from __future__ import annotations

from pathlib import Path

import click

from gpulane.cli.client import _dumps, _session, client_options


@click.command("upload")
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False,
                                                       readable=True, path_type=Path))
@click.option("--content-type", default=None,
              help="The file's type [guessed from its suffix, else application/octet-stream].")
@click.option("--name", default=None, help="The name kept in its record [the file's name].")
@click.option("--json", "as_json", is_flag=True, help="Print the upload's whole record.")
@client_options
def upload_cmd(path: Path, content_type: str | None, name: str | None, as_json: bool, url: str,
               token: str | None) -> None:
    """Upload FILE to the node (POST /v1/files) and print its id. The upload lives on that
    node, and goes after file_retain_s (24 h by default)."""
    with _session(url, token) as client:
        record = client.upload(path, content_type=content_type, name=name)
    click.echo(_dumps(record) if as_json else record["id"])
