"""`loom cluster …`: Ray clusters on verified supplier nodes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from loom.client.cli.common import (
    EXIT_API,
    client_for,
    console,
    fail,
    print_json,
    styled_state,
)
from loom.client.sdk import LoomClient
from loom.core.spec import SpecError, load_spec, spec_from_flags
from loom.protocol.api import ClusterOut

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


def _wait(client: LoomClient, cluster: ClusterOut, timeout: float) -> ClusterOut:
    deadline = time.monotonic() + timeout
    with console.status("placing …") as status:
        while cluster.state in ("requested", "provisioning", "healing"):
            status.update(f"{cluster.name}: {_phase(cluster)} …")
            if time.monotonic() > deadline:
                fail(
                    f"cluster {cluster.name} still {cluster.state} after {timeout:.0f} s", EXIT_API
                )
            time.sleep(0.25)
            cluster = client.cluster(cluster.id)
    return cluster


@app.command("up")
def up(
    ctx: typer.Context,
    spec_file: Annotated[Path | None, typer.Argument(help="cluster.yaml (optional)")] = None,
    name: Annotated[str | None, typer.Option(help="cluster name")] = None,
    nodes: Annotated[int | None, typer.Option(help="number of nodes")] = None,
    gpu: Annotated[str | None, typer.Option(help="MODEL[:COUNT] per node, e.g. rtx4090:2")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPU cores per node (instead of --gpu)")] = None,
    region: Annotated[str | None, typer.Option(help="regions, comma-separated")] = None,
    max_price: Annotated[str | None, typer.Option(help="credits per device-hour")] = None,
    duration: Annotated[str | None, typer.Option(help="e.g. 30m, 2h (default 1h)")] = None,
    env: Annotated[list[str], typer.Option(help="KEY=VALUE for the Ray nodes")] = [],  # noqa: B006
    wait: Annotated[bool, typer.Option(help="wait until the cluster is ready")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 180.0,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Create a cluster from a spec file and/or flags; shows live progress."""
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
        cluster = client.create_cluster(spec)
        if wait:
            cluster = (
                _wait(client, cluster, timeout)
                if not json_out
                else client.wait_cluster(cluster.id, timeout=timeout)
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
    if cluster.state == "failed":
        fail(f"cluster {cluster.name} failed: {cluster.reason}", EXIT_API)


def _print_next_steps(cluster: ClusterOut) -> None:
    console.print(f"  Ray address:  [bold]{cluster.head_address}[/]")
    if cluster.dashboard_url:
        console.print(f"  dashboard:    {cluster.dashboard_url}")
    console.print(f"  price:        {cluster.price_per_hour} credits/hour")
    console.print("next:")
    console.print(
        f"  RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(loom cluster token {cluster.name}) "
        f"python -c 'import ray; ray.init(address=\"{cluster.head_address}\"); print(ray.nodes())'"
    )
    console.print(f"  loom cluster status {cluster.name}      loom cluster down {cluster.name}")


@app.command("status")
def status(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A cluster's state, head address and members."""
    with client_for(ctx) as client:
        cluster = client.cluster(name)
    if json_out:
        print_json(_status_json(cluster))
        return
    console.print(
        f"[bold]{cluster.name}[/] ({cluster.id}) {styled_state(cluster.state)}"
        + (f" — {cluster.reason}" if cluster.reason else "")
    )
    console.print(f"head: {cluster.head_address or '-'}   price: {cluster.price_per_hour}/h")
    table = Table()
    for col in ("member", "node", "role", "state", "devices", "reason"):
        table.add_column(col)
    for m in cluster.members:
        table.add_row(
            m.id,
            m.node_name or m.node_id,
            m.role,
            styled_state(m.state),
            ", ".join(m.devices),
            m.reason,
        )
    console.print(table)


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
    if json_out:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} cluster(s)", title_justify="left")
    for col in ("name", "id", "state", "nodes", "head", "price/h"):
        table.add_column(col)
    for c in rows:
        live = sum(1 for m in c.members if m.state in ("assigned", "starting", "ready"))
        table.add_row(
            c.name, c.id, styled_state(c.state), str(live), c.head_address or "-", c.price_per_hour
        )
    console.print(table)


@app.command("down")
def down(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Stop every member, remove its files, free the devices."""
    with client_for(ctx) as client, console.status(f"tearing down {name} …"):
        cluster = client.delete_cluster(name)
    if json_out:
        print_json(cluster)
        return
    console.print(f"cluster [bold]{cluster.name}[/] {styled_state(cluster.state)}")
