"""`loom cluster …`: Ray clusters on verified supplier nodes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich import box
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from loom.client.cli.common import (
    EXIT_API,
    client_for,
    console,
    fail,
    globals_from,
    print_json,
    report_error,
    styled_state,
)
from loom.client.cli.costs import ClusterMoney, cluster_money
from loom.client.sdk import LoomAPIError, LoomClient, LoomError
from loom.core.money import format_credits
from loom.core.spec import SpecError, format_duration, load_spec, spec_from_flags
from loom.protocol.api import ClusterOut
from loom.protocol.money import QuoteOut

app = typer.Typer(help="Ray clusters: up, status, list, down.", no_args_is_help=True)


def _parse_env(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def build_spec(
    spec_file: Path | None,
    *,
    name: str | None,
    nodes: int | None,
    gpu: str | None,
    cpus: int | None,
    regions: str | None,
    max_price: str | None,
    duration: str | None,
    env: list[str],
) -> dict[str, Any]:
    """The spec the user asked for: the file (if any) with command-line flags on top."""
    if gpu is not None and cpus is not None:
        fail(
            "give either --gpu or --cpus, not both (a node is sold by GPUs or by CPU cores)",
            field="gpu",
        )
    base: dict[str, Any] = {}
    if spec_file is not None:
        try:
            text = spec_file.read_text()
        except OSError as exc:
            fail(f"cannot read {spec_file}: {exc.strerror}")
        try:
            load_spec(text)  # full validation with line numbers for YAML errors
        except SpecError as exc:
            fail(f"{spec_file}: {exc}")
        loaded = yaml.safe_load(text)
        base = loaded if isinstance(loaded, dict) else {}
    try:
        spec = spec_from_flags(
            base,
            name=name,
            nodes=nodes,
            gpu=gpu,
            cpus=cpus,
            regions=regions,
            max_price=max_price,
            duration=duration,
            env=_parse_env(env),
        )
    except SpecError as exc:
        fail(str(exc))
    return spec.model_dump(mode="json", exclude_none=True)


PHASES = {
    "requested": "placing",
    "provisioning": "starting head",
    "running": "ready",
}


def _phase(cluster: ClusterOut) -> str:
    if cluster.state != "provisioning":
        return PHASES.get(cluster.state, cluster.state)
    head = next((m for m in cluster.members if m.role == "head"), None)
    if head is None or head.state != "ready":
        return "starting head"
    workers = [m for m in cluster.members if m.role == "worker" and m.state != "lost"]
    ready = sum(1 for m in workers if m.state == "ready")
    return f"joining workers ({ready}/{len(workers)})"


FINAL_STATES = ("running", "failed", "terminated")


def _wait(client: LoomClient, cluster: ClusterOut, timeout: float) -> ClusterOut:
    """Poll until the cluster is running, failed or terminated (a failing cluster passes
    through `terminating` first: that is not an end)."""
    deadline = time.monotonic() + timeout
    with console.status("placing …") as status:
        while cluster.state not in FINAL_STATES:
            status.update(f"{cluster.name}: {_phase(cluster)} …")
            if time.monotonic() > deadline:
                fail(
                    f"cluster {cluster.name} still {cluster.state} after {timeout:.0f} s", EXIT_API
                )
            time.sleep(0.25)
            cluster = client.cluster(cluster.id)
    return cluster


RETRY_CODES = ("no_capacity",)


@app.command("up")
def up(
    ctx: typer.Context,
    spec_file: Annotated[Path | None, typer.Argument(help="cluster.yaml (optional)")] = None,
    name: Annotated[str | None, typer.Option(help="cluster name")] = None,
    nodes: Annotated[int | None, typer.Option(help="number of nodes")] = None,
    gpu: Annotated[str | None, typer.Option(help="MODEL[:COUNT] per node, e.g. rtx4090:2")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPU cores per node (instead of --gpu)")] = None,
    region: Annotated[
        str | None, typer.Option(help="regions, comma-separated (default: `loom config` region)")
    ] = None,
    max_price: Annotated[str | None, typer.Option(help="credits per device-hour")] = None,
    duration: Annotated[str | None, typer.Option(help="e.g. 30m, 2h (default 1h)")] = None,
    env: Annotated[list[str], typer.Option(help="KEY=VALUE for the Ray nodes")] = [],  # noqa: B006
    wait: Annotated[bool, typer.Option(help="wait until the cluster is ready")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 180.0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="no confirmation prompt")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show the plan and its price, create nothing")
    ] = False,
    retry_until_up: Annotated[
        bool,
        typer.Option("--retry-until-up", help="no capacity yet: retry every 5 s until --timeout"),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Create a cluster from a spec file and/or flags: shows the plan and its price, asks
    for confirmation on a terminal (--yes skips it), then shows live progress."""
    if region is None and spec_file is None:
        region = globals_from(ctx).config().region
    spec = build_spec(
        spec_file,
        name=name,
        nodes=nodes,
        gpu=gpu,
        cpus=cpus,
        regions=region,
        max_price=max_price,
        duration=duration,
        env=env,
    )
    with client_for(ctx) as client:
        t0 = time.monotonic()
        deadline = t0 + timeout
        plan = _retrying(lambda: client.quote(spec), retry_until_up, deadline)
        if dry_run:
            if json_out:
                print_json(plan)
            else:
                print_plan(client, spec, plan)
            return
        if not json_out:
            print_plan(client, spec, plan)
            if not yes and sys.stdin.isatty() and not typer.confirm("create it?", default=True):
                fail("not created", EXIT_API, error_code="declined")
        cluster = _retrying(lambda: client.create_cluster(spec), retry_until_up, deadline)
        if wait:
            remaining = max(1.0, deadline - time.monotonic())
            cluster = (
                _wait(client, cluster, remaining)
                if not json_out
                else client.wait_cluster(cluster.id, timeout=remaining)
            )
        elapsed = time.monotonic() - t0
    if json_out:
        print_json(cluster)
    elif cluster.state == "running":
        console.print(f"[green]✓[/] cluster [bold]{cluster.name}[/] is running ({elapsed:.1f} s)")
        _print_next_steps(cluster)
    elif not wait:
        console.print(
            f"cluster [bold]{cluster.name}[/] is {cluster.state}; "
            f"see `loom cluster status {cluster.name}`"
        )
    if wait and cluster.state != "running":
        fail(
            f"cluster {cluster.name} {cluster.state}: "
            f"{without_traceback(cluster.reason) or 'no reason given'}; "
            f"see `loom cluster status {cluster.name}`",
            EXIT_API,
            error_code=f"cluster_{cluster.state}",
        )


T = TypeVar("T")


def without_traceback(reason: str) -> str:
    """A reason as a user reads it: a Python traceback quoted from a node's log (its
    `File …` lines) is cut to its first and last line."""
    out: list[str] = []
    skipping = False
    lines = reason.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            skipping = True
            out.append(line.split("Traceback (most recent call last)")[0] + "(traceback cut)")
            continue
        if skipping and (line[:1].isspace() or not line.strip()) and i < len(lines) - 1:
            continue
        skipping = False
        out.append(line.strip() if out and out[-1].endswith("(traceback cut)") else line)
    return "\n".join(x.rstrip() for x in out).strip()


def _retrying(call: Callable[[], T], retry: bool, deadline: float) -> T:
    """`call()`, retried every 5 s on no_capacity while `retry` and before `deadline`."""
    shown = False
    while True:
        try:
            return call()
        except LoomAPIError as exc:
            if not retry or exc.code not in RETRY_CODES or time.monotonic() + 5 > deadline:
                raise
            if not shown:
                report_error(f"{exc.message}; retrying every 5 s (--retry-until-up)", EXIT_API)
                shown = True
            time.sleep(5)


def print_plan(client: LoomClient, spec: dict[str, Any], plan: QuoteOut) -> None:
    """Nodes, prices, escrow and the quote against cloud list prices, before spending."""
    names = _node_names(client, [m.node_id for m in plan.members])
    console.print(
        f"plan for [bold]{escape(str(spec.get('name', '')))}[/]: {len(plan.members)} node(s), "
        f"{plan.devices} × {escape(plan.model)}, for {format_duration(plan.duration_s)}",
        highlight=False,
    )
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("node", "role", "region", "devices", "credits/device-hour"):
        table.add_column(col, justify="right" if col.startswith(("credits", "devices")) else "left")
    for m in plan.members:
        table.add_row(names.get(m.node_id, m.node_id), m.role, m.region, str(m.units), m.price)
    console.print(table)
    console.print(f"  price    {plan.price_per_hour} credits/hour, {plan.total} for the duration")
    console.print(
        f"  escrow   {plan.escrow} credits held from your balance now; "
        "unused escrow is refunded at `cluster down`"
    )
    if plan.hyperscaler_price_per_hour is not None:
        console.print(
            f"  clouds   {plan.hyperscaler_price_per_hour}/hour at the hyperscaler median "
            f"(saving {plan.saving_pct} %)"
        )
    try:
        balance = client.balance().balance
        console.print(f"  balance  {balance} credits available")
    except LoomError:
        pass


def _node_names(client: LoomClient, node_ids: list[str]) -> dict[str, str]:
    try:
        return {n.id: n.name for n in client.nodes() if n.id in set(node_ids)}
    except LoomError:
        return {}


def _print_next_steps(cluster: ClusterOut) -> None:
    console.print(f"  Ray address:  [bold]{cluster.head_address}[/]")
    if cluster.dashboard_url:
        console.print(f"  dashboard:    {cluster.dashboard_url}")
    console.print(f"  price:        {cluster.price_per_hour} credits/hour")
    console.print("next:")
    # soft_wrap: a command is never broken by the terminal width, so it copies whole.
    steps = (
        f"  RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(loom cluster token {cluster.name}) "
        f"python -m loom.examples.spread {cluster.head_address} {len(cluster.members)}",
        f"  loom job submit {cluster.name} -- python -c 'import ray; ray.init(); "
        "print(ray.cluster_resources())'",
        f"  loom cluster status {cluster.name}",
        f"  loom cluster down {cluster.name}",
    )
    for step in steps:
        console.print(escape(step), soft_wrap=True, highlight=False)


@app.command("status")
def status(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="refresh every 2 s until it ends (Ctrl-C stops)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A cluster's state, head address, members and what it has spent."""
    if watch and json_out:
        fail("--watch and --json do not go together; poll `status --json` instead", field="watch")
    with client_for(ctx) as client:
        cluster = client.cluster(name)
        money = cluster_money(client, [cluster])[cluster.id]
        if json_out:
            print_json({**_status_json(cluster), "cost": money.as_json()})
            return
        if not watch:
            console.print(_status_view(cluster, money))
            return
        with Live(_status_view(cluster, money), console=console, auto_refresh=False) as live:
            while cluster.state not in ("terminated", "failed"):
                time.sleep(2.0)
                cluster = client.cluster(cluster.id)
                money = cluster_money(client, [cluster])[cluster.id]
                live.update(_status_view(cluster, money), refresh=True)


def _status_view(cluster: ClusterOut, money: ClusterMoney) -> Group:
    head = Text.from_markup(
        f"[bold]{escape(cluster.name)}[/] ({cluster.id}) {styled_state(cluster.state)}"
        + (f" — {escape(without_traceback(cluster.reason))}" if cluster.reason else "")
    )
    line = Text(
        f"head: {cluster.head_address or '-'}   price: {cluster.price_per_hour} credits/hour   "
        f"spent: {format_credits(money.spent_micro)} (settled)   "
        f"escrow left: {format_credits(money.escrow_left_micro)}"
    )
    table = Table()
    overlay = any(m.overlay_ip for m in cluster.members)
    columns = ("member", "node", "role", "state", "devices", "overlay", "reason")
    for col in columns if overlay else tuple(c for c in columns if c != "overlay"):
        table.add_column(col)
    for m in cluster.members:
        cells = [
            m.id,
            m.node_name or m.node_id,
            m.role,
            styled_state(m.state),
            ", ".join(m.devices),
        ]
        if overlay:  # the member's overlay address, and whether it is reached by relay only
            cells.append(
                f"{m.overlay_ip}{' (relayed)' if m.relayed else ''}" if m.overlay_ip else "-"
            )
        table.add_row(*cells, escape(m.reason))
    return Group(head, line, table)


def _status_json(cluster: ClusterOut) -> dict[str, Any]:
    data = cluster.model_dump(mode="json")
    data["members"] = [
        {
            "node_id": m.node_id,
            "node_name": m.node_name,
            "role": m.role,
            "state": m.state,
            "devices": m.devices,
            "id": m.id,
            "reason": m.reason,
            "overlay_ip": m.overlay_ip,
            "relayed": m.relayed,
        }
        for m in cluster.members
    ]
    return data


@app.command("token")
def token(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="cluster name or id")]
) -> None:
    """Print the cluster's Ray auth token (owner only)."""
    with client_for(ctx) as client:
        cluster = client.cluster(name)
    print(cluster.ray_token)


@app.command("list")
def list_clusters(
    ctx: typer.Context,
    all_states: Annotated[bool, typer.Option("--all", help="include ended clusters")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Your clusters."""
    with client_for(ctx) as client:
        rows = client.clusters(all_states=all_states)
        money = cluster_money(client, rows)
    if json_out:
        print_json([{**c.model_dump(mode="json"), "cost": money[c.id].as_json()} for c in rows])
        return
    table = Table(title=f"{len(rows)} cluster(s)", title_justify="left")
    for col in ("name", "id", "state", "nodes", "head", "credits/hour", "spent", "escrow left"):
        table.add_column(col, justify="right" if col in ("spent", "escrow left") else "left")
    for c in rows:
        live = sum(1 for m in c.members if m.state in ("assigned", "starting", "ready"))
        m = money[c.id]
        table.add_row(
            c.name,
            c.id,
            styled_state(c.state),
            str(live),
            c.head_address or "-",
            c.price_per_hour,
            format_credits(m.spent_micro),
            format_credits(m.escrow_left_micro),
        )
    console.print(table)
    if rows:
        console.print("spent: settled from escrow so far (settlement runs at least every 60 s)")


@app.command("down")
def down(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Stop every member, remove its files, free the devices."""
    with client_for(ctx) as client:
        with console.status(f"tearing down {name} …"):
            cluster = client.delete_cluster(name)
        money = cluster_money(client, [cluster])[cluster.id]
    if json_out:
        print_json({**cluster.model_dump(mode="json"), "cost": money.as_json()})
        return
    console.print(f"cluster [bold]{cluster.name}[/] {styled_state(cluster.state)}")
    print_cost(money)


def print_cost(money: ClusterMoney) -> None:
    console.print(
        f"  cost      {format_credits(money.spent_micro)} credits "
        f"(of {format_credits(money.escrowed_micro)} held in escrow)"
    )
    console.print(f"  refunded  {format_credits(money.refunded_micro)} credits to your balance")
    console.print(
        f"  suppliers earned {format_credits(money.suppliers_micro)} credits "
        f"(settled {format_credits(money.spent_micro)} minus the platform fee "
        f"{format_credits(money.fee_micro)})"
    )
