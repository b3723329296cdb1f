"""`loom up`: the embedded default — a coordinator and a few local agents on one machine.

Each part runs as its own process, exactly as it would on separate machines: the
coordinator on 127.0.0.1 with SQLite under $LOOM_HOME, and N agents that dial out to it.
Ctrl-C (or SIGTERM) stops everything: agents drain first, then the coordinator.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from loom.client.cli.common import EXIT_API, EXIT_UNREACHABLE, console, fail
from loom.client.cli.nodes import nodes_table
from loom.client.config import ClientConfig
from loom.client.sdk import LoomClient, LoomError
from loom.coordinator.replicas.link import (
    CREDS_ENV,
    BusAuthFailed,
    BusConfigError,
    BusUnavailable,
    NatsLink,
    redact,
)
from loom.demo import run_demo
from loom.protocol.keystore import loom_home

DEFAULT_BUS = "nats://127.0.0.1:4222"
REGIONS = ("eu-west", "eu-west", "eu-central", "us-east")
PRICES = ("0.30", "0.35", "0.40", "0.45")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def overlay_options() -> list[str]:
    """The coordinator's overlay options for `loom up`: on where its agents can join it
    (root, Nebula installed: members get their own namespaces), else off."""
    if os.geteuid() != 0 or not (shutil.which("nebula") and shutil.which("nebula-cert")):
        return []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        port = int(s.getsockname()[1])
    # Members reach a lighthouse on their own machine through their veth, not loopback.
    return ["--overlay-listen", f"0.0.0.0:{port}", "--overlay-advertise", f"127.0.0.1:{port}"]


@dataclass
class LocalNetwork:
    """A coordinator and agents as child processes; `stop()` takes them all down."""

    home: Path
    port: int
    agents: int
    runtime: str
    host: str = "127.0.0.1"
    heartbeat_timeout: float = 15.0
    db_url: str | None = None
    #: Coordinator replicas (> 1 needs PostgreSQL in ``db_url`` and NATS at ``bus_url``).
    replicas: int = 1
    bus_url: str = DEFAULT_BUS
    #: A file with the bus credentials (``coordinator serve --bus-creds``), or "".
    bus_creds: str = ""
    coordinator: subprocess.Popen[bytes] | None = None
    replica_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    replica_ports: list[int] = field(default_factory=list)
    agent_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def urls(self) -> list[str]:
        """Every replica's URL (the first is ``url``)."""
        return [f"http://{self.host}:{p}" for p in self.replica_ports or [self.port]]

    def agent_coordinators(self, i: int) -> str:
        """Agent ``i``'s ``--coordinator``: every replica, starting with its own share of
        them (agents spread over the replicas, and fail over to the others)."""
        urls = self.urls
        k = i % len(urls)
        return ",".join(urls[k:] + urls[:k])

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("LOOM_BUS", CREDS_ENV)}
        env["LOOM_HOME"] = str(self.home)
        env["LOOM_COORDINATOR"] = self.url
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _serve_cmd(self, port: int) -> list[str]:
        cmd = [
            sys.executable, "-m", "loom", "coordinator", "serve",
            "--host", self.host, "--port", str(port), "--faucet",
            "--heartbeat-timeout", str(self.heartbeat_timeout),
        ]  # fmt: skip
        if self.db_url:
            cmd += ["--db", self.db_url]
        return cmd

    def start(self) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if self.replicas > 1:
            # One network, several coordinators: one PostgreSQL, NATS between them. Each
            # replica runs a lighthouse of the one overlay (its own UDP port); they share
            # the CA through $LOOM_HOME/overlay (r1 creates it).
            self.replica_ports = [self.port] + [
                free_port(self.host) for _ in range(1, self.replicas)
            ]
            for i, port in enumerate(self.replica_ports):
                cmd = [*self._serve_cmd(port), "--replica-id", f"r{i + 1}", *overlay_options()]
                # The bus URL (it may hold a password) and the credentials file go in the
                # environment, not on command lines every local user can read.
                env = self._env() | {"LOOM_BUS": self.bus_url}
                if self.bus_creds:
                    env[CREDS_ENV] = self.bus_creds
                self.replica_procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        stdout=open(logs / f"coordinator-r{i + 1}.log", "ab"),
                        stderr=subprocess.STDOUT,
                    )
                )
                if i == 0:  # the first migrates the database; the others wait for it
                    self.coordinator = self.replica_procs[0]
                    self.wait_healthy()
            for port in self.replica_ports[1:]:
                self.wait_healthy(url=f"http://{self.host}:{port}")
        else:
            self.coordinator = subprocess.Popen(
                self._serve_cmd(self.port) + overlay_options(),
                env=self._env(),
                stdout=open(logs / "coordinator.log", "ab"),
                stderr=subprocess.STDOUT,
            )
            self.replica_procs = [self.coordinator]
            self.wait_healthy()
        for i in range(self.agents):
            name = f"local-{i + 1}"
            agent_cmd = [
                sys.executable, "-m", "loom", "worker", "start",
                "--name", name, "--region", REGIONS[i % len(REGIONS)],
                "--price", PRICES[i % len(PRICES)], "--runtime", self.runtime,
                "--coordinator", self.agent_coordinators(i),
            ]  # fmt: skip
            self.agent_procs.append(
                subprocess.Popen(
                    agent_cmd,
                    env=self._env(),
                    stdout=open(logs / f"{name}.log", "ab"),
                    stderr=subprocess.STDOUT,
                )
            )

    def wait_healthy(self, timeout: float = 30.0, url: str | None = None) -> None:
        url = url or self.url
        deadline = time.monotonic() + timeout
        config = ClientConfig(coordinator=url, home=self.home, key_name="default")
        with LoomClient.from_config(config, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.coordinator is not None and self.coordinator.poll() is not None:
                    raise RuntimeError(
                        f"the coordinator exited with code {self.coordinator.returncode}; "
                        f"see {self.home / 'logs' / 'coordinator.log'}"
                    )
                try:
                    client.health()
                    return
                except LoomError:
                    time.sleep(0.2)
        raise RuntimeError(f"the coordinator did not answer on {url} within {timeout:.0f} s")

    def wait_nodes(self, client: LoomClient, count: int, timeout: float = 240.0) -> None:
        """Until `count` local agents are verified and available (the CPU challenge of
        each takes several seconds, more on a loaded machine)."""
        deadline = time.monotonic() + timeout
        mine = client.key.public_hex
        while time.monotonic() < deadline:
            ready = [
                n
                for n in client.nodes(owner=mine)
                if n.state in ("available", "allocated") and n.name.startswith("local-")
            ]
            if len(ready) >= count:
                return
            for proc in self.agent_procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"an agent exited with code {proc.returncode}; see {self.home / 'logs'}"
                    )
            time.sleep(0.3)
        raise RuntimeError(f"{count} agents did not come up within {timeout:.0f} s")

    def stop(self) -> None:
        for proc in self.agent_procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        _wait_all(self.agent_procs, 20)
        coordinators = self.replica_procs or ([self.coordinator] if self.coordinator else [])
        for proc in coordinators:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        _wait_all(coordinators, 15)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_bus(bus: str, creds: str) -> None:
    """Reach the bus once before starting anything: a wrong URL or credential is one line."""
    if not bus.startswith(("nats://", "tls://")):
        fail(f"--bus must be nats://HOST:PORT, got {redact(bus)!r}")
    try:
        asyncio.run(NatsLink(bus, "up", creds).probe())
    except (BusAuthFailed, BusConfigError) as exc:
        fail(str(exc))
    except BusUnavailable as exc:
        fail(str(exc), EXIT_UNREACHABLE)


def default_runtime() -> str:
    return "bwrap" if shutil.which("bwrap") else "process"


def up(
    agents: Annotated[int, typer.Option(help="how many local agents to start")] = 3,
    port: Annotated[int, typer.Option(help="coordinator port (a free one if taken)")] = 8700,
    runtime: Annotated[
        str | None, typer.Option(help="sandbox for workloads (default: bwrap if installed)")
    ] = None,
    demo: Annotated[
        bool, typer.Option(help="run the demo end to end, then stop everything and exit")
    ] = False,
    replicas: Annotated[
        int, typer.Option(help="coordinator replicas (more than 1 needs --db postgresql://…)")
    ] = 1,
    db: Annotated[
        str | None,
        typer.Option(help="the coordinators' database (default: SQLite under $LOOM_HOME)"),
    ] = None,
    bus: Annotated[
        str,
        typer.Option(
            envvar="LOOM_BUS",
            help="the NATS server between replicas (with --replicas > 1; "
            "nats://USER:PASS@HOST:PORT or nats://TOKEN@HOST:PORT if it wants credentials)",
        ),
    ] = DEFAULT_BUS,
    bus_creds: Annotated[
        str,
        typer.Option(
            envvar=CREDS_ENV, help="file with the bus credentials (USER:PASS, TOKEN or .creds)"
        ),
    ] = "",
) -> None:
    """Start the embedded network: a coordinator and local agents, until Ctrl-C.

    With ``--replicas N --db postgresql://…`` it is a local HA network: N coordinator
    replicas on one PostgreSQL database and a NATS server, agents spread over them."""
    if not 1 <= agents <= 16:
        fail("--agents must be between 1 and 16")
    if not 1 <= replicas <= 9:
        fail("--replicas must be between 1 and 9")
    if replicas > 1 and not (db or "").startswith("postgresql"):
        fail("--replicas > 1 share one PostgreSQL database: pass --db postgresql://USER@HOST/DB")
    if replicas > 1:
        check_bus(bus, bus_creds)
    home = loom_home()
    home.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    if not port_free(host, port):
        new_port = free_port(host)
        console.print(f"[yellow]port {port} is taken; using {new_port}[/]")
        port = new_port
    net = LocalNetwork(
        home=home, port=port, agents=agents, runtime=runtime or default_runtime(), db_url=db,
        replicas=replicas, bus_url=bus, bus_creds=bus_creds,
    )  # fmt: skip
    interrupted = False

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        with console.status(f"starting coordinator on {net.url} …"):
            net.start()
        config = ClientConfig(coordinator=net.url, home=home, key_name="default")
        with LoomClient.from_config(config) as client:
            with console.status(f"waiting for {agents} agents to join …"):
                net.wait_nodes(client, agents)
            console.print(nodes_table(client.nodes()))
            console.print(f"explorer: [bold]{net.url}/[/]   API docs: {net.url}/docs")
            if replicas > 1:
                console.print(f"replicas: {', '.join(net.urls)} (bus {redact(bus)})")
            console.print(
                f"use it from another terminal: [bold]export LOOM_COORDINATOR={net.url}[/]"
            )
            if demo:
                code = run_demo(client, agents)
            else:
                console.print("press Ctrl-C to stop everything")
                while True:
                    time.sleep(1)
                    if all(p.poll() is not None for p in net.replica_procs):
                        fail("the coordinator stopped; see its log", EXIT_API)
    except KeyboardInterrupt:
        interrupted = True
    except (RuntimeError, LoomError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        code = EXIT_API
    finally:
        with console.status("stopping agents and coordinator …"):
            net.stop()
        console.print("stopped" + (" (interrupted)" if interrupted else ""))
    raise typer.Exit(code)
