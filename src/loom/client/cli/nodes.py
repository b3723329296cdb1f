"""`loom nodes`: the network's supply."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from loom.client.cli.common import ago, client_for, console, fail, print_json, styled_state
from loom.core.models import NodeState
from loom.protocol.api import NodeOut

NODE_STATES = tuple(s.value for s in NodeState)

node_app = typer.Typer(help="One node you own.", no_args_is_help=True)


def nodes(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    mine: Annotated[bool, typer.Option("--mine", help="only nodes owned by my key")] = False,
    state: Annotated[
        str | None, typer.Option(help=f"only nodes in this state: {', '.join(NODE_STATES)}")
    ] = None,
) -> None:
    """List nodes with their state, region, devices and last heartbeat."""
    if state is not None and state not in NODE_STATES:
        fail(
            f"--state {state!r} is not a node state; use one of: {', '.join(NODE_STATES)}",
            field="state",
        )
    with client_for(ctx) as client:
        owner = client.key.public_hex if mine else None
        rows = client.nodes(owner=owner, state=state)
    if json_out:
        print_json(rows)
        return
    console.print(nodes_table(rows))


def nodes_table(rows: list[NodeOut]) -> Table:
    now = time.time()
    table = Table(title=f"{len(rows)} node(s)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True, min_width=14)
    table.add_column("name", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("region", no_wrap=True)
    table.add_column("devices")
    table.add_column("price/h", no_wrap=True)
    table.add_column("heartbeat", no_wrap=True)
    table.add_column("owner", no_wrap=True)
    for node in rows:
        devs = ", ".join(
            (f"{d.model} ×{d.count}" if d.kind == "cpu" else d.model) + (" ✓" if d.verified else "")
            for d in node.devices
        )
        table.add_row(
            node.id,
            node.name,
            styled_state(node.state),
            node.region,
            devs,
            node.price,
            ago(node.last_heartbeat, now),
            node.owner[:8] + "…",
        )
    return table


@node_app.command("remove")
def remove(
    ctx: typer.Context,
    node_id: Annotated[str, typer.Argument(help="the node's id (see `loom nodes --mine`)")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Remove a node you own from the network (stop its agent first).

    The node is never placed again and its node key is refused from then on; its
    earnings and history stay on record.
    """
    with client_for(ctx) as client:
        row = client.remove_node(node_id)
    if json_out:
        print_json(row)
        return
    console.print(f"removed node {row.id} ({row.name}); it will not be placed again")
