"""``gpulane routes``: the server's content-type routes (``GET /v1/routes``), most specific
first, as a table or as JSON."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpulane.cli.client import _dumps, _session, client_options


@click.command("routes")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@client_options
def routes_cmd(as_json: bool, url: str, token: str | None) -> None:
    """Show which preset a task with a content type and no preset goes to (first match)."""
    with _session(url, token) as client:
        info = client.routes()
    if as_json:
        click.echo(_dumps(info))
        return
    out = Console(highlight=False)
    routes = info.get("routes") or []
    if not routes:
        out.print("no routes: tasks must name their preset (add a routes: section to a "
                  "preset file)", markup=False)
        return
    table = Table("content type", "preset")
    for r in routes:
        table.add_row(escape(str(r.get("content_type", "?"))), escape(str(r.get("preset", "?"))))
    out.print(table)
