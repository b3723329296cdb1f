"""`loom key …`: the keypair that is your account."""

from __future__ import annotations

from typing import Annotated

import typer

from loom.client.cli.common import console, fail, globals_from, print_json
from loom.protocol.identity import IdentityError

app = typer.Typer(
    help="Keys: an Ed25519 keypair is your account (no sign-up).", no_args_is_help=True
)


@app.command("new")
def new(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Option(help="key name (default: the active key name)")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing key of that name")] = False,
) -> None:
    """Create a keypair under $LOOM_HOME/keys (private key mode 0600)."""
    config = globals_from(ctx).config()
    key_name = name or config.key_name
    try:
        key = config.keystore.create(key_name, overwrite=force)
    except IdentityError as exc:
        fail(str(exc))
    console.print(f"created key [bold]{key_name}[/] at {config.keystore.path(key_name)}")
    console.print(f"public key (your account): [bold]{key.public_hex}[/]")


@app.command("show")
def show(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show the active key's public half (the default key is created on first use)."""
    config = globals_from(ctx).config()
    try:
        key = config.load_key()
    except IdentityError as exc:
        fail(str(exc))
    if json_out:
        print_json(
            {
                "name": config.key_name,
                "public_key": key.public_hex,
                "path": str(config.keystore.path(config.key_name)),
            }
        )
        return
    console.print(f"{config.key_name}: {key.public_hex}", highlight=False)


@app.command("list")
def list_keys(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the keys under $LOOM_HOME/keys."""
    config = globals_from(ctx).config()
    rows = []
    for key_name in config.keystore.names():
        try:
            rows.append({"name": key_name, "public_key": config.keystore.load(key_name).public_hex})
        except IdentityError as exc:
            rows.append({"name": key_name, "public_key": f"unreadable: {exc}"})
    if json_out:
        print_json(rows)
        return
    for row in rows:
        marker = "*" if row["name"] == config.key_name else " "
        console.print(f"{marker} {row['name']:<24} {row['public_key']}", highlight=False)
