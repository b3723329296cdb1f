"""`loom coordinator …`: run the coordinator."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from loom.coordinator.app import create_app
from loom.coordinator.config import Settings, default_db_url
from loom.coordinator.db.engine import DatabaseURLError, normalize_url
from loom.coordinator.overlay.authority import OverlayConfigError
from loom.coordinator.overlay.service import check_network_ca, check_overlay
from loom.coordinator.replicas.link import (
    CREDS_ENV,
    BusAuthFailed,
    BusConfigError,
    BusUnavailable,
    NatsLink,
    redact,
)
from loom.coordinator.server import uvicorn_options
from loom.protocol.keystore import loom_home

#: A NATS subject token (loom.replica.<id>.cmd): no dots, spaces or wildcards.
_REPLICA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

app = typer.Typer(
    help="Run the coordinator (API, agent endpoint, database, loops).", no_args_is_help=True
)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8700,
    db: Annotated[
        str | None,
        typer.Option(
            help="sqlite:///PATH or postgresql://USER@HOST/DB (default: $LOOM_HOME/coordinator.db)"
        ),
    ] = None,
    heartbeat_timeout: Annotated[
        float, typer.Option(help="seconds without a heartbeat before a node is offline")
    ] = 15.0,
    restart_grace: Annotated[
        float,
        typer.Option(help="after a start, seconds before anyone is judged offline (reconnects)"),
    ] = 35.0,
    faucet: Annotated[
        bool,
        typer.Option("--faucet/--no-faucet", help="mint credits on request (embedded/demo mode)"),
    ] = False,
    settle_interval: Annotated[
        float, typer.Option(min=0.1, max=60.0, help="seconds between settlements (≤ 60)")
    ] = 30.0,
    fee_bps: Annotated[
        int, typer.Option(min=0, max=9999, help="platform fee in basis points (500 = 5 %)")
    ] = 500,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    overlay_listen: Annotated[
        str, typer.Option(help="run the Nebula lighthouse+relay on this UDP HOST:PORT (off if '')")
    ] = "",
    overlay_advertise: Annotated[
        str, typer.Option(help="HOST:PORT[,…] members reach the lighthouse at (default: listen)")
    ] = "",
    overlay_network: Annotated[
        str, typer.Option(help="private IPv4 range of the overlay's addresses")
    ] = "10.250.0.0/16",
    overlay_dir: Annotated[
        str,
        typer.Option(
            help="the overlay CA's directory (default $LOOM_HOME/overlay); every replica "
            "needs the same ca.crt and ca.key there"
        ),
    ] = "",
    overlay_cert_lifetime: Annotated[
        float,
        typer.Option(
            min=10.0,
            help="seconds an overlay certificate lives (renewed while its cluster lives)",
        ),
    ] = 4 * 3600.0,
    bus: Annotated[
        str,
        typer.Option(
            envvar="LOOM_BUS",
            help="nats://[USER:PASS@|TOKEN@]HOST:PORT[,…] of the NATS bus between coordinator "
            "replicas (needs --db postgresql://…; '' = a single coordinator). With a secret, "
            "prefer $LOOM_BUS or --bus-creds: a command line is visible to every local user",
        ),
    ] = "",
    bus_creds: Annotated[
        str,
        typer.Option(
            envvar=CREDS_ENV,
            help="file with the bus credentials: one line USER:PASS or TOKEN, or a NATS "
            ".creds file (chmod 600)",
        ),
    ] = "",
    replica_id: Annotated[
        str | None,
        typer.Option(help="this replica's name, unique among live replicas (default HOST-PID)"),
    ] = None,
) -> None:
    """Serve the HTTP API and the agent WebSocket."""
    home = loom_home()
    home.mkdir(parents=True, exist_ok=True)
    url = db or default_db_url(home)
    try:
        normalize_url(url)
    except DatabaseURLError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if bus and not bus.startswith(("nats://", "tls://")):
        typer.echo(f"error: --bus must be nats://HOST:PORT, got {redact(bus)!r}", err=True)
        raise typer.Exit(2)
    if bus_creds and not bus:
        typer.echo("error: --bus-creds needs --bus", err=True)
        raise typer.Exit(2)
    if bus and url.startswith("sqlite"):
        typer.echo(
            "error: replicas (--bus) share one PostgreSQL database: pass --db postgresql://…",
            err=True,
        )
        raise typer.Exit(2)
    if replica_id is not None and not _REPLICA_ID.fullmatch(replica_id):
        typer.echo(
            "error: --replica-id may use letters, digits, '-' and '_' (at most 64)", err=True
        )
        raise typer.Exit(2)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if bus:
        check_bus(bus, bus_creds, replica_id or "check")
    settings = Settings(
        db_url=url,
        host=host,
        port=port,
        heartbeat_timeout_s=heartbeat_timeout,
        restart_grace_s=restart_grace,
        faucet=faucet,
        settle_interval_s=settle_interval,
        fee_bps=fee_bps,
        overlay_listen=overlay_listen,
        overlay_advertise=overlay_advertise,
        overlay_network=overlay_network,
        overlay_dir=overlay_dir,
        overlay_cert_lifetime_s=overlay_cert_lifetime,
        bus_url=bus,
        bus_creds=bus_creds,
    )
    if replica_id:
        settings.replica_id = replica_id
    if bus_creds:  # the replica's link reads it from here (the app builds the link)
        os.environ[CREDS_ENV] = bus_creds
    try:
        check_overlay(settings)
        asyncio.run(check_network_ca(settings))
    except OverlayConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=log_level.lower(), **uvicorn_options()
    )


def check_bus(bus: str, creds: str, replica_id: str) -> None:
    """Connect to the bus once before serving: a wrong credential (exit 2) or an
    unreachable server (exit 3) is one line, never a traceback nor a secret."""
    try:
        asyncio.run(NatsLink(bus, replica_id, creds).probe())
    except (BusAuthFailed, BusConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except BusUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
