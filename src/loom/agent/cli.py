"""`loom worker …`: run the supplier agent on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from loom.agent import metrics as agent_metrics
from loom.agent.config import AgentConfig, agent_ws_urls
from loom.agent.inventory import DeclaredProbe, GpuProbe, InventoryError, default_probe
from loom.agent.main import Agent, AgentRefused
from loom.agent.members import MemberManager
from loom.agent.netns import NetnsConfig
from loom.agent.netns import for_agent as member_networks
from loom.agent.runtimes import Runtime, SandboxError, select_runtime
from loom.agent.supplier_log import SupplierLog, alive, read_status
from loom.agent.tunnel import AgentTunnel
from loom.agent.verification import ChallengeHandler
from loom.core.models import validate_country, validate_region
from loom.core.money import AmountError, parse_credits
from loom.protocol.identity import IdentityError
from loom.protocol.keystore import DEFAULT_KEY_NAME, KeyStore, loom_home

app = typer.Typer(help="Run the supplier agent: join the network and earn.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@app.command("start")
def start(
    coordinator: Annotated[
        str | None,
        typer.Option(
            help="coordinator URL, or several replicas' URL1,URL2,… to fail over between "
            "(default $LOOM_COORDINATOR or http://127.0.0.1:8700)"
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="node name (default: hostname)")] = None,
    region: Annotated[str, typer.Option(help="region, e.g. eu-west, us-east")] = "eu-west",
    country: Annotated[str, typer.Option(help="ISO 3166 country code, e.g. DE")] = "",
    price: Annotated[
        str, typer.Option(help="credits per device-hour, e.g. 0.35, or 'auto' (network median)")
    ] = "auto",
    inventory: Annotated[
        Path | None, typer.Option(help="YAML list of declared devices NVML cannot see")
    ] = None,
    runtime: Annotated[
        str | None, typer.Option(help="sandbox for workloads: bwrap (default), docker, process")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="address other cluster nodes reach this machine at "
            "(default: this machine's address on the route to the coordinator)"
        ),
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="owner key name (default $LOOM_KEY or 'default')")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    metrics_port: Annotated[
        int | None, typer.Option(help="serve Prometheus /metrics on this port (0: any free one)")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="address the metrics port binds")] = "127.0.0.1",
    egress: Annotated[
        str, typer.Option(help="members' access to the public internet: internet or none")
    ] = "internet",
    member_network: Annotated[
        str, typer.Option(help="private IPv4 range for members' own network namespaces")
    ] = "10.201.0.0/16",
) -> None:
    """Connect this machine to the coordinator and serve work until SIGTERM."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = coordinator or os.environ.get("LOOM_COORDINATOR") or "http://127.0.0.1:8700"
    node_name = name or socket.gethostname()
    try:
        agent_ws_urls(url)
        validate_region(region)
        if country:
            validate_country(country)
        if price.strip().lower() != "auto":
            parse_credits(price)
        NetnsConfig(address_range=member_network, egress=egress)
    except (ValueError, AmountError) as exc:
        raise _fail(str(exc)) from None
    home = loom_home()
    keys = KeyStore.for_home(home)
    try:
        owner = keys.load_or_create(key or os.environ.get("LOOM_KEY") or DEFAULT_KEY_NAME)
        node_key = keys.load_or_create(f"node-{_safe(node_name)}")
    except IdentityError as exc:
        raise _fail(str(exc)) from None
    probe: GpuProbe
    try:
        probe = DeclaredProbe.from_file(inventory) if inventory else default_probe()
    except InventoryError as exc:
        raise _fail(str(exc)) from None
    first = url.split(",")[0].strip()  # replicas share one network: any will do
    address = advertise_address(first, address)
    config = AgentConfig(
        coordinator=url,
        name=node_name,
        region=region,
        country=country,
        price=price,
        work_dir=home / "agents" / _safe(node_name),
        runtime=runtime,
        advertise_address=address,
        egress=egress,
        member_network=member_network,
    )
    try:
        sandbox = select_runtime(runtime)
    except (SandboxError, ValueError) as exc:
        raise _fail(str(exc)) from None
    agent = Agent(config, node_key=node_key, owner_key=owner, probe=probe, runtimes=[sandbox.name])
    try:
        agent_metrics.configure(metrics_port, metrics_host)
        asyncio.run(_run(agent, sandbox, config))
    except AgentRefused as exc:
        raise _fail(str(exc)) from None


#: How long a drained agent waits for its worker threads before it exits without them.
EXIT_GRACE_S = 10.0


async def _run(agent: Agent, sandbox: Runtime, config: AgentConfig) -> None:
    # Our own default executor, so that the drained agent can bound its wait for it.
    executor = ThreadPoolExecutor(thread_name_prefix="loom-agent")
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        await _serve(agent, sandbox, config)
    finally:
        await _stop_threads(executor, EXIT_GRACE_S)


async def _stop_threads(executor: ThreadPoolExecutor, grace: float) -> None:
    """Shut the worker threads down, waiting at most ``grace`` seconds. Called once the
    agent has drained (members stopped, namespaces removed); a thread that is still busy
    then must not keep the process alive after SIGTERM (``asyncio.run`` would join it
    for ever), so the agent writes every thread's stack to its log and exits."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not stopped.done():
            stopped.set_result(None)

    def close() -> None:
        executor.shutdown(wait=True)
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=close, name="loom-agent-exit", daemon=True).start()
    await asyncio.wait({stopped}, timeout=grace)
    if not stopped.done():
        logging.getLogger(__name__).warning(
            "a worker thread is still busy %g s after the drain; exiting without it "
            "(every thread's stack follows)",
            grace,
        )
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)


async def _serve(agent: Agent, sandbox: Runtime, config: AgentConfig) -> None:
    agent.install_signal_handlers()
    base = config.work_dir / "members"
    network = NetnsConfig(address_range=config.member_network, egress=config.egress)
    members = MemberManager(
        base,
        sandbox,
        agent.report,
        node_ip=config.advertise_address,
        netns=member_networks(base, sandbox.name, network),
    )
    leftovers = await members.cleanup_leftovers()
    if leftovers:
        logging.getLogger(__name__).info("removed leftovers of earlier members: %s", leftovers)
    agent.handlers.update(members.handlers())
    challenges = ChallengeHandler(agent)
    agent.handlers.update(challenges.handlers())
    agent.on_drain.append(challenges.abort_all)
    agent.on_drain.append(members.stop_all)
    supplier = SupplierLog(config.coordinator.split(",")[0].strip(), config.name, config.work_dir)
    agent.on_connected.append(supplier.connected)
    agent.on_command.append(supplier.command)

    async def drained() -> None:
        supplier.drained()

    agent.on_drain.append(drained)
    tunnel = AgentTunnel(agent.send_bytes, members.head_ports)
    agent.on_binary = tunnel.on_frame
    agent.on_disconnect.append(tunnel.reset)
    await agent_metrics.serve(agent, members)
    members.start_health_loop()
    await agent.run()


def advertise_address(coordinator: str, given: str | None) -> str:
    """`given`, else this machine's source address on the route to the coordinator (a
    connected UDP socket: no packet is sent); loopback when the coordinator is local.
    Warns when a loopback address is advertised to a coordinator elsewhere: other nodes
    could not reach this one."""
    parts = urlsplit(coordinator)
    host = parts.hostname or "127.0.0.1"
    remote = not _is_loopback(host)
    if given is None:
        if not remote:
            return "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, parts.port or 80))
                found = str(s.getsockname()[0])
        except OSError as exc:
            logging.getLogger(__name__).warning(
                "cannot find the route to %s (%s); advertising 127.0.0.1: pass --address", host, exc
            )
            return "127.0.0.1"
        logging.getLogger(__name__).info("advertising %s (route to %s)", found, host)
        return found
    if remote and _is_loopback(given):
        logging.getLogger(__name__).warning(
            "advertising loopback %s to the coordinator at %s: other cluster nodes cannot "
            "reach this machine there; pass --address with this machine's reachable address",
            given,
            host,
        )
    return given


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command("status")
def status(
    name: Annotated[str | None, typer.Option(help="node name (default: the only one here)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """This machine's agent: state, verification, current clusters, earnings today."""
    agents = loom_home() / "agents"
    names = (
        sorted(p.name for p in agents.iterdir() if (p / "status.json").exists())
        if (agents.is_dir())
        else []
    )
    if name is None and len(names) == 1:
        name = names[0]
    if name is None:
        hint = f"choose one with --name: {', '.join(names)}" if names else "start one"
        raise _fail(f"no single agent under {agents}; {hint} (`loom worker start`)")
    data = read_status(agents / _safe(name))
    if data is None:
        known = f" (known here: {', '.join(names)})" if names else ""
        raise _fail(f"no node {name!r} has run on this machine{known}")
    running = alive(data.get("pid"))
    if not running and data.get("state") != "drained":
        data["state"] = "stopped"
    data["running"] = running
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(
        f"{data['name']} ({data.get('node_id') or '?'}): {data['state']}"
        + ("" if running else " — the agent is not running")
    )
    typer.echo(f"  coordinator   {data.get('coordinator', '?')}")
    typer.echo(f"  verified      {'; '.join(data.get('verified') or []) or 'not yet'}")
    clusters = data.get("clusters") or []
    typer.echo(
        "  clusters      "
        + (", ".join(f"{c['id']} ({c['role']})" for c in clusters) if clusters else "none")
    )
    typer.echo(f"  price         {data.get('price') or '?'} credits/device-hour")
    typer.echo(
        f"  earnings      {data.get('earnings_today', '0')} credits today (gross, settled); "
        f"{data.get('earnings_settled', '0')} in total"
    )


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:48]
    return cleaned.strip(".-") or "node"
