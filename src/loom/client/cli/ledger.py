"""`loom ledger verify`: recompute the hash chain and every invariant."""

from __future__ import annotations

from typing import Annotated

import typer

from loom.client.cli.common import EXIT_API, client_for, console, err_console, print_json

app = typer.Typer(help="The public ledger.", no_args_is_help=True)


@app.command("verify")
def verify(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Ask the coordinator to re-verify the whole ledger; exit 0 only if every check holds."""
    with client_for(ctx) as client:
        out = client.ledger_verify()
    if json_out:
        print_json(out)
    elif out.ok:
        console.print(
            f"[green]ok[/]: {out.count} transactions, head {out.head_hash[:16]}…, "
            f"minted {out.minted} credits, balances sum to {out.total}"
        )
    else:
        err_console.print(f"[bold red]ledger verification failed[/]: {out.failure}")
    if not out.ok:
        raise typer.Exit(EXIT_API)
