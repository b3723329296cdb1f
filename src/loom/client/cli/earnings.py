"""`loom earnings` and `loom payout request`: what your nodes earned, and withdrawing it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from loom.client.cli.common import client_for, console, print_json
from loom.client.cli.credits import check_amount
from loom.protocol.money import EarningLineOut

payout_app = typer.Typer(help="Withdraw settled earnings.", no_args_is_help=True)


COLUMNS = (
    "id",
    "name",
    "settled (gross, from escrow)",
    "credited to you (net of fee)",
    "pending (accrued, not settled)",
)


def _table(title: str, rows: list[EarningLineOut]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("id", "name") else "right")
    for r in rows:
        table.add_row(r.id, r.name, r.settled, r.paid, r.pending)
    return table


def earnings(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Your nodes' earnings per node and per cluster: settled and pending."""
    with client_for(ctx) as client:
        out = client.earnings()
    if json_out:
        print_json(out)
        return
    console.print(
        f"available [bold]{out.available}[/] credits (withdraw with `loom payout request`); "
        f"paid out {out.paid_out}; platform fee {out.fee_bps / 100:g} %"
    )
    if out.nodes:
        console.print(_table("per node", out.nodes))
        console.print(_table("per cluster", out.clusters))
        console.print(
            "credits: settled = what clusters paid for your nodes' time; the platform fee is "
            "taken from it; pending is settled within a minute"
        )
    else:
        console.print("no earnings yet: your nodes have not served a cluster")


@payout_app.command("request")
def request(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="credits to withdraw, e.g. 10")],
    idempotency_key: Annotated[
        str | None, typer.Option(help="retrying with the same key never pays twice")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Withdraw settled earnings through the coordinator's payout adapter."""
    amount = check_amount(amount)
    with client_for(ctx) as client:
        receipt = client.payout(amount, idempotency_key=idempotency_key)
    if json_out:
        print_json(receipt)
        return
    console.print(
        f"paid out [bold]{receipt.amount}[/] credits ({receipt.receipt}); "
        f"earnings left {receipt.balance}"
    )
