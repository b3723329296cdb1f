"""Real agents in the homes of a NAT namespace topology (tests/support/nat.py).

For tests that run a Loom cluster across NATs: the coordinator (an in-process
``CoordinatorThread``) listens on the "public" address, each home runs real agents with
``nsenter`` into its namespace, and what the test leaves behind is checked at the end.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from loom.agent.netns import netns_names, unavailable_reason
from loom.agent.raynode_spec import agent_tag
from loom.coordinator.config import Settings
from support.nat import Topology, sh
from support.servers import agent_env, free_port


def skip_reason() -> str | None:
    """Why the NAT tests cannot run here (None: they can)."""
    reason = unavailable_reason()
    if reason is None and shutil.which("nebula") is None:
        reason = "nebula is not installed (make sysdeps)"
    if reason is None and shutil.which("bwrap") is None:
        reason = "bubblewrap is not installed (make sysdeps)"
    return None if reason is None else f"needs root, iproute2, nftables, nebula ({reason})"


def nat_settings(
    settings: Settings, topology: Topology, tmp_path: Path, heartbeat_timeout_s: float = 6.0
) -> Settings:
    """The coordinator on the topology's public address, with its lighthouse/relay."""
    settings.host = topology.coord_ip
    settings.overlay_listen = f"{topology.coord_ip}:{free_port()}"
    settings.overlay_dir = str(tmp_path / "overlay")
    settings.heartbeat_timeout_s = heartbeat_timeout_s
    return settings


def coordinator_url(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.port}"


def start_agent(
    topology: Topology, i: int, url: str, home: Path, name: str, price: str = "auto"
) -> subprocess.Popen[bytes]:
    """``loom worker start`` inside home ``i``'s machine (1-3 suppliers, 4 the user's)."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{topology.host(i)}",
            sys.executable,
            "-m",
            "loom",
            "worker",
            "start",
            "--name",
            name,
            "--coordinator",
            url,
            "--price",
            price,
        ],
        env=agent_env(home, url),
        stdout=open(home / "agent.log", "wb"),
        stderr=subprocess.STDOUT,
    )


def member_tags(homes: Iterable[tuple[Path, str]]) -> tuple[str, ...]:
    """Prefixes of the member namespaces of agents (home dir, name) started here."""
    return tuple(agent_tag(home / "agents" / name / "members") + "-" for home, name in homes)


def stop_agents(
    agents: Sequence[subprocess.Popen[bytes]], timeout: float = 30.0
) -> list[subprocess.Popen[bytes]]:
    """SIGTERM (the agent stops its members and removes their namespaces), then SIGKILL;
    returns the agents that had to be killed (a SIGKILLed agent cannot clean up)."""
    for p in agents:
        if p.poll() is None:
            p.terminate()
    killed = []
    for p in agents:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"agent {p.args!r} ignored SIGTERM for {timeout:g} s: SIGKILL")
            for sig in (signal.SIGUSR2, signal.SIGUSR1):  # its task and thread stacks, to its log
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
                time.sleep(1)
            p.kill()
            p.wait()
            killed.append(p)
    return killed


def leftovers(tags: tuple[str, ...], tmp_path: Path) -> list[str]:
    """What agents of this test left: member namespaces, Nebula processes (their tun
    devices live in those namespaces and go with them)."""
    left = [f"netns {n}" for n in netns_names() if n.startswith(tags)]
    nebulas = sh("pgrep", "-af", "nebula", check=False)
    left += [  # the agents' member Nebulas (the coordinator's lighthouse stops after the test)
        f"process {line}"
        for line in nebulas.splitlines()
        if f"{tmp_path}/" in line and "/members/" in line
    ]
    return left
