"""The `loom` command line: one typer app, one module per command group."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from loom.client.cli import (
    challenge,
    cluster,
    cluster_exec,
    connect,
    credits,
    earnings,
    evidence,
    forward,
    job,
    keys,
    ledger,
    market,
    nodes,
    settings,
)
from loom.client.cli.common import Globals

app = typer.Typer(
    name="loom",
    help="Loom: verified GPU supply, instant Ray clusters, per-second billing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def loom_version() -> str:
    try:
        return version("loom")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"loom {loom_version()}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    ctx: typer.Context,
    coordinator: Annotated[
        str | None,
        typer.Option(
            help="coordinator URL (else $LOOM_COORDINATOR, else `loom config`, "
            "else http://127.0.0.1:8700)"
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(help="key name to sign with (else $LOOM_KEY, else `loom config`, 'default')"),
    ] = None,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
    ctx.obj = Globals(coordinator=coordinator, key=key)


app.add_typer(keys.app, name="key")
app.add_typer(settings.app, name="config")
app.add_typer(cluster.app, name="cluster")
app.command("nodes")(nodes.nodes)
app.add_typer(nodes.node_app, name="node")
app.add_typer(credits.app, name="credits")
app.command("offers")(market.offers)
app.command("quote")(market.quote)
app.command("earnings")(earnings.earnings)
app.add_typer(earnings.payout_app, name="payout")
app.add_typer(ledger.app, name="ledger")
app.add_typer(evidence.app, name="evidence")
app.add_typer(challenge.app, name="challenge")
cluster.app.command("forward")(forward.forward)
cluster.app.command("connect")(connect.connect)
cluster.app.command("exec")(cluster_exec.exec_command)
app.add_typer(job.app, name="job")
