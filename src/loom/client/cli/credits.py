"""`loom credits deposit|balance|history`: your balance on the ledger."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from loom.client.cli.common import ago, client_for, console, fail, print_json
from loom.core.money import AmountError, parse_credits

app = typer.Typer(help="Credits: deposit, balance, history.", no_args_is_help=True)


def check_amount(amount: str) -> str:
    """Refuse a bad amount on the command line (exit 2) before asking the coordinator."""
    try:
        parse_credits(amount)
    except AmountError as exc:
        fail(f"amount: {exc}")
    return amount.strip()


@app.command("deposit")
def deposit(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="credits, e.g. 50 or 12.5")],
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="retrying with the same key never deposits twice"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Deposit credits (embedded mode: minted by the coordinator's faucet)."""
    amount = check_amount(amount)
    with client_for(ctx) as client:
        receipt = client.deposit(amount, idempotency_key=idempotency_key)
    if json_out:
        print_json(receipt)
        return
    note = " (already done: replayed)" if receipt.replayed else ""
    console.print(
        f"deposited [bold]{receipt.amount}[/] credits{note}; balance {receipt.balance} "
        f"(ledger seq {receipt.seq})"
    )


@app.command("balance")
def balance(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Your available credits and what is held in escrow for your clusters."""
    with client_for(ctx) as client:
        out = client.balance()
    if json_out:
        print_json({"balance": out.balance, "escrowed": out.escrowed, "earnings": out.earnings})
        return
    console.print(f"balance  [bold]{out.balance}[/] credits")
    console.print(f"escrowed {out.escrowed} credits (held for your clusters)")
    if out.earnings != "0":
        console.print(f"earnings {out.earnings} credits (withdraw with `loom payout request`)")


@app.command("history")
def history(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="how many entries")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Your ledger entries, newest first."""
    with client_for(ctx) as client:
        rows = client.history(limit=limit)
    if json_out:
        print_json(rows)
        return
    now = time.time()
    table = Table(title=f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}", title_justify="left")
    for col in ("seq", "when", "kind", "account", "amount", "cluster", "memo"):
        table.add_column(col, justify="right" if col in ("seq", "amount") else "left")
    for r in rows:
        table.add_row(
            str(r.seq), ago(r.created_at, now), r.kind, r.account, r.amount, r.cluster, r.memo
        )
    console.print(table)
