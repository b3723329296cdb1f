"""`loom cluster forward NAME`: local ports to the head's Ray ports through the coordinator."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import typer
from rich.markup import escape

from loom.client.cli.common import EXIT_API, client_for, console, err_console, fail
from loom.client.forward import Forwarder
from loom.client.sdk import LoomAPIError, LoomError
from loom.protocol.identity import KeyPair

USABLE_STATES = ("running", "healing")


def forward(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    dashboard: Annotated[
        int, typer.Option(help="local port for the Ray dashboard and Jobs API (0: none)")
    ] = 8265,
    client: Annotated[int, typer.Option(help="local port for the Ray client (0: none)")] = 10001,
    bind: Annotated[str, typer.Option(help="local address to listen on")] = "127.0.0.1",
) -> None:
    """Reach the head's Ray Jobs API and Ray client port from here, until Ctrl-C."""
    if dashboard < 0 or client < 0 or dashboard > 65535 or client > 65535:
        fail("ports must be between 1 and 65535 (0 to skip one)")
    targets = {t: p for t, p in (("dashboard", dashboard), ("client", client)) if p}
    if not targets:
        fail("nothing to forward: give --dashboard or --client a port")
    with client_for(ctx) as loom:
        cluster = loom.cluster(name)
        if cluster.state not in USABLE_STATES:
            fail(f"cluster {cluster.name} is {cluster.state}; forward needs it running", EXIT_API)
        base_url, key, cluster_id = loom.base_url, loom.key, cluster.id
    try:
        asyncio.run(_serve(base_url, key, cluster_id, targets, bind, cluster.ray_token))
    except KeyboardInterrupt:
        pass
    except LoomAPIError as exc:
        fail(f"{exc.message} [{exc.code}]", EXIT_API)
    except LoomError as exc:
        fail(str(exc), EXIT_API)
    except OSError as exc:
        fail(f"cannot listen on {bind}: {exc.strerror or exc} (pick another port)")


async def _serve(
    base_url: str, key: KeyPair, ref: str, targets: dict[str, int], bind: str, token: str
) -> None:
    def warn(message: str) -> None:
        err_console.print(f"[yellow]{escape(message)}[/]", highlight=False)

    forwarders = [Forwarder(base_url, key, ref, t, host=bind, port=p, on_error=warn)
                  for t, p in targets.items()]  # fmt: skip
    await forwarders[0].check()
    async with contextlib.AsyncExitStack() as stack:
        for fwd in forwarders:
            await stack.enter_async_context(fwd)
        for fwd in forwarders:
            if fwd.target == "dashboard":
                console.print(f"Ray dashboard / Jobs API  http://{bind}:{fwd.port}")
            else:
                console.print(f"Ray client               ray://{bind}:{fwd.port}")
        console.print("\nThe cluster's Ray token (only you can see it):")
        console.print(f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token}", highlight=False)
        if "dashboard" in targets:
            port = next(f.port for f in forwarders if f.target == "dashboard")
            console.print(
                f"  ray job submit --address http://{bind}:{port} -- python train.py",
                highlight=False,
            )
        console.print("\nForwarding; Ctrl-C to stop.", style="dim")
        await asyncio.Event().wait()
