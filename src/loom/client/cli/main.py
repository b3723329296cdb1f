"""The `loom` command line: one typer app, one module per command group."""

from __future__ import annotations

from typing import Annotated

import typer

from loom.client.cli import (
    cluster,
    credits,
    earnings,
    evidence,
    forward,
    job,
    keys,
    ledger,
    market,
    nodes,
)
from loom.client.cli.common import Globals

app = typer.Typer(
    name="loom",
    help="Loom: verified GPU supply, instant Ray clusters, per-second billing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main_options(
    ctx: typer.Context,
    coordinator: Annotated[
        str | None,
        typer.Option(help="coordinator URL (else $LOOM_COORDINATOR, else http://127.0.0.1:8700)"),
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="key name to sign with (else $LOOM_KEY, else 'default')")
    ] = None,
) -> None:
    ctx.obj = Globals(coordinator=coordinator, key=key)


app.add_typer(keys.app, name="key")
app.add_typer(cluster.app, name="cluster")
app.command("nodes")(nodes.nodes)
app.add_typer(credits.app, name="credits")
app.command("offers")(market.offers)
app.command("quote")(market.quote)
app.command("earnings")(earnings.earnings)
app.add_typer(earnings.payout_app, name="payout")
app.add_typer(ledger.app, name="ledger")
app.add_typer(evidence.app, name="evidence")
cluster.app.command("forward")(forward.forward)
app.add_typer(job.app, name="job")
