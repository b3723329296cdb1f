"""A real Loom network on loopback for bench/gpu_check.py: one coordinator process and
agent processes (``python -m loom worker start``), each with its own home, and a client.

The coordinator runs as ``gpu_check.py coordinator`` (the same ``create_app`` and uvicorn
set-up as ``loom coordinator serve``) so that the check can choose two settings the CLI
does not expose: ``require_verified`` and a long retry delay for failed devices (so a
retry never lands in the middle of a later measurement).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from loom.client.sdk import LoomClient, LoomConnectionError, LoomError
from loom.protocol.api import NodeOut
from loom.protocol.keystore import KeyStore
from loom.protocol.verification import ChallengeOut

T = TypeVar("T")
FINAL_OUTCOMES = frozenset({"passed", "failed", "interrupted"})
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (its threads included), from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class AgentProc:
    name: str
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Network:
    """A coordinator and its agents under ``root``; :meth:`stop` takes them all down."""

    root: Path
    python: str
    script: Path
    require_verified: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    coordinator: subprocess.Popen[bytes] | None = None
    agents: dict[str, AgentProc] = field(default_factory=dict)
    _client: LoomClient | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client_home(self) -> Path:
        return self.root / "client"

    def base_env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["LOOM_HOME"] = str(home)
        env["LOOM_COORDINATOR"] = self.url
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("LOOM_KEY", None)
        return env

    def start(self, timeout: float = 60.0) -> Network:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.root / "coordinator.log"
        cmd = [
            self.python, str(self.script), "coordinator", "--port", str(self.port),
            "--db", f"sqlite:///{self.root / 'coordinator.db'}",
            "--require-verified" if self.require_verified else "--no-require-verified",
        ]  # fmt: skip
        self.coordinator = subprocess.Popen(
            cmd,
            env=self.base_env(self.root),
            stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited: {tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"the coordinator did not answer within {timeout:.0f} s: {tail(log)}")

    def client(self) -> LoomClient:
        if self._client is None:
            key = KeyStore.for_home(self.client_home).load_or_create("default")
            self._client = LoomClient(self.url, key, timeout=30.0)
        return self._client

    def call(self, fn: Callable[[LoomClient], T], timeout: float) -> T:
        """``fn(client)``, retried while the coordinator does not answer (a loaded machine
        can stall it past the client's 30 s read timeout), for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn(self.client())
            except LoomConnectionError as exc:
                if time.monotonic() > deadline or (
                    self.coordinator is not None and self.coordinator.poll() is not None
                ):
                    log = tail(self.root / "coordinator.log", 1500)
                    raise LoomConnectionError(f"{exc}; coordinator log: {log}") from None
                time.sleep(1.0)

    def coordinator_cpu_s(self) -> float | None:
        return None if self.coordinator is None else process_cpu_s(self.coordinator.pid)

    def add_agent(
        self,
        name: str,
        *,
        runtime: str,
        inventory: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> AgentProc:
        home = self.root / "agents" / name
        home.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.python, "-m", "loom", "worker", "start", "--name", name,
            "--runtime", runtime, "--price", "0.5", "--region", "eu-west",
        ]  # fmt: skip
        if inventory is not None:
            path = home / "devices.yaml"
            path.write_text(inventory)
            cmd += ["--inventory", str(path)]
        full_env = self.base_env(home)
        full_env.update(env or {})
        log = home / "agent.log"
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        agent = AgentProc(name, home, proc, log)
        self.agents[name] = agent
        return agent

    def node(self, name: str) -> NodeOut | None:
        with contextlib.suppress(LoomError, httpx.HTTPError):
            for n in self.client().nodes():
                if n.name == name:
                    return n
        return None

    def wait_node(self, agent: AgentProc, timeout: float) -> NodeOut:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not agent.alive():
                raise RuntimeError(f"agent {agent.name} exited: {tail(agent.log)}")
            node = self.node(agent.name)
            if node is not None and node.devices:
                return node
            time.sleep(0.3)
        raise RuntimeError(f"agent {agent.name} did not register within {timeout:.0f} s")

    def wait_challenges(
        self, agent: AgentProc, node_id: str, device_ids: list[str], timeout: float
    ) -> dict[str, ChallengeOut]:
        """The first final outcome (passed/failed/interrupted) of each device; errors are
        retried by the coordinator, so they are waited through. Raises on timeout."""
        deadline = time.monotonic() + timeout
        found: dict[str, ChallengeOut] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(LoomError, httpx.HTTPError):
                for c in reversed(self.client().node_challenges(node_id)):  # oldest first
                    if c.device_id in device_ids and c.outcome in FINAL_OUTCOMES:
                        found.setdefault(c.device_id, c)
            if all(d in found for d in device_ids):
                return found
            if not agent.alive():
                raise RuntimeError(f"agent {agent.name} exited: {tail(agent.log)}")
            time.sleep(0.5)
        missing = [d for d in device_ids if d not in found]
        raise TimeoutError(
            f"no final challenge outcome for {missing} within {timeout:.0f} s "
            f"(have {sorted(found)})"
        )

    def stop(self) -> None:
        for agent in self.agents.values():
            if agent.alive():
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            agent.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGTERM)
            try:
                self.coordinator.wait(20)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()
                self.coordinator.wait(10)


def challenge_record(c: ChallengeOut, ops_per_round: int | None = None) -> dict[str, Any]:
    """The figures of one challenge as the coordinator recorded them, and (given the
    class's W_r) the prover's wall time estimated from the best-window pace."""
    rate = c.measured_rate
    est = round(ops_per_round / rate, 6) if ops_per_round and rate else None
    return {
        "device_id": c.device_id,
        "device_class": c.device_class,
        "outcome": c.outcome,
        "passed": c.passed,
        "reason": c.reason,
        "best_window_rate": c.measured_rate,
        "required_rate": c.required_rate,
        "challenge_wall_s": round(c.duration_s, 3),
        "openings_checked": c.openings_checked,
        "openings_failed": c.openings_failed,
        "evidence": c.evidence,
        "trigger": c.trigger,
        "prover_round_s_est": est,
    }
