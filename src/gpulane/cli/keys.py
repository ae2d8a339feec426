"""``gpulane keys``: make API keys. The key is printed once; the node keeps only its digest."""

from __future__ import annotations

import sys

import click

from gpulane.errors import ConfigError


@click.group()
def keys() -> None:
    """Make API keys for a node's keys file (docs/security.md)."""


@keys.command("new")
@click.argument("name")
@click.option("--scopes", default="tasks", show_default=True,
              help="comma-separated: tasks, leases, admin (admin implies the others)")
def keys_new(name: str, scopes: str) -> None:
    """Print a fresh key for NAME once, and the keys file entry (its SHA-256) to paste."""
    from gpulane.api.keys import check_name, check_scopes, file_entry, new_key

    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    try:
        check_name(name, "NAME")
        check_scopes(wanted, "--scopes")
    except ConfigError as exc:
        click.echo(f"gpulane keys new: {exc}", err=True)
        sys.exit(2)
    key = new_key()
    click.echo(f"key for {name} (shown only now; the app sends it as GPULANE_TOKEN):")
    click.echo(key)
    click.echo("\nentry for the keys file (keys_file), under 'keys:':")
    click.echo(file_entry(name, key, wanted).rstrip())
