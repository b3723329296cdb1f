"""One member's Ray node on a supplier's machine: start, readiness, health, stop.

The agent's main loop turns the coordinator's "start head" / "start worker" / "stop
member" commands into :class:`RayNode` calls::

    node = RayNode(spec, runtime, ports)     # spec: RayNodeSpec from the command
    await node.start()                       # `ray start --block` inside the runtime
    info = await node.wait_ready(60)         # registered and ALIVE in the head's GCS
    health = await node.health()             # process alive + node ALIVE in the GCS
    await node.stop()                        # whole process tree killed, dirs removed

``ray start --block`` stays in the foreground for as long as the node lives, so the
runtime's handle *is* the node: when it dies the node is gone, and killing it (plus the
marker sweep, see runtimes/base.py) takes down the raylet, GCS, dashboard and workers.

Ports: every member gets its own block of host ports from a :class:`PortAllocator`
(several Ray nodes share one machine in the demo, and all of them use the host network).
Addresses: Ray rewrites ``127.0.0.1``/``localhost`` to the machine's outward IP on Linux,
so loopback clusters use ``127.0.0.2`` (see :func:`loom.agent.raynode_spec.ray_host`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import loom
from loom.agent.raynode_ports import (
    PortAllocator,
    PortBlock,
    PortLease,
    PortsExhausted,
    port_is_free,
)
from loom.agent.raynode_spec import (
    LOOPBACK_NODE_IP,
    MemberPaths,
    RayNodeError,
    RayNodeSpec,
    Role,
    agent_tag,
    build_env,
    build_ray_start_argv,
    default_ray_executable,
    member_short_id,
    ray_address,
    ray_host,
)
from loom.agent.runtimes.base import (
    ProcessHandle,
    RunSpec,
    Runtime,
    SandboxError,
    find_sandboxes,
    sweep,
)
from loom.agent.runtimes.limits import disk_usage, remove_stale

__all__ = [
    "LOOPBACK_NODE_IP",
    "MemberPaths",
    "NodeHealth",
    "PortAllocator",
    "PortBlock",
    "PortLease",
    "PortsExhausted",
    "RayNode",
    "RayNodeError",
    "RayNodeInfo",
    "RayNodeSpec",
    "Role",
    "cleanup_stale_members",
    "ray_address",
    "ray_host",
]

NodeState = Literal["new", "starting", "ready", "failed", "stopped"]

#: Where the ``loom`` package lives, for the probe subprocess's PYTHONPATH.
_LOOM_SRC = str(Path(loom.__file__).resolve().parent.parent)


# ----------------------------------------------------------------------------- node


@dataclass(frozen=True)
class RayNodeInfo:
    """What the agent reports once the node is ready."""

    node_id: str
    node_ip: str
    gcs_address: str
    ports: PortBlock
    dashboard_url: str | None = None
    client_address: str | None = None


@dataclass(frozen=True)
class NodeHealth:
    process_alive: bool
    node_alive: bool
    node_id: str | None = None
    detail: str = ""
    #: Ray node ids the head's GCS lists ALIVE, as this node sees them.
    alive_ids: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.process_alive and self.node_alive


class RayNode:
    """The Ray node of one member; see the module docstring for the call sequence.

    ``start()`` must be awaited on the agent's long-lived event-loop thread (the sandbox
    dies with the thread that spawned it). All methods are idempotent.
    """

    def __init__(
        self,
        spec: RayNodeSpec,
        runtime: Runtime,
        ports: PortAllocator | None = None,
        *,
        ray_executable: str | None = None,
        probe_python: str | None = None,
    ) -> None:
        if spec.ports is None and ports is None:
            raise ValueError("give either spec.ports or a PortAllocator")
        self.spec = spec
        self.runtime = runtime
        self.paths = MemberPaths.for_spec(spec)
        self.marker = f"{agent_tag(spec.base_dir)}-{member_short_id(spec)}"
        self._allocator = ports
        self._lease: PortLease | None = None
        self._ports = spec.ports
        self._ray = ray_executable or (
            default_ray_executable() if runtime.uses_host_python else "ray"
        )
        self._python = probe_python or sys.executable
        self._handle: ProcessHandle | None = None
        self.state: NodeState = "new"
        self.info: RayNodeInfo | None = None

    # -- addresses

    @property
    def ports(self) -> PortBlock:
        if self._ports is None:
            raise RayNodeError("ports are allocated by start()")
        return self._ports

    @property
    def node_ip(self) -> str:
        return ray_host(self.spec.node_ip)

    @property
    def gcs_address(self) -> str:
        """The head's GCS address: this node's for a head, ``head_address`` for a worker."""
        if self.spec.role == "head":
            return f"{self.node_ip}:{self.ports.gcs}"
        assert self.spec.head_address is not None
        return ray_address(self.spec.head_address)

    @property
    def pid(self) -> int | None:
        return None if self._handle is None else self._handle.pid

    # -- lifecycle

    async def start(self) -> None:
        """Launch ``ray start --block`` in the runtime; returns once it is spawned."""
        if self.state in ("starting", "ready"):
            return
        if self.state == "stopped":
            raise RayNodeError("this node was stopped; create a new RayNode to restart")
        if self._ports is None:
            assert self._allocator is not None
            self._lease = self._allocator.allocate()
            self._ports = self._lease.block
        else:
            # Given explicitly (not probed by an allocator): fail now, not after Ray's
            # own timeouts (a GCS that cannot bind makes `ray start` wait ~40 s).
            busy = [p for p in self._ports.ports() if not port_is_free(p)]
            if busy:
                self.state = "failed"
                raise RayNodeError(
                    f"ports {busy[:5]} of the block for {self.spec.member_id} are in use"
                )
        try:
            self._make_dirs()
            run = self._run_spec()
            self._handle = self.runtime.spawn(run)
        except (OSError, SandboxError) as exc:
            await self.stop()
            self.state = "failed"
            raise RayNodeError(f"could not start Ray node of {self.spec.member_id}: {exc}") from exc
        self.state = "starting"

    def _make_dirs(self) -> None:
        p = self.paths
        for d in (p.root, p.home, p.work, p.tmp, p.ray_temp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _run_spec(self) -> RunSpec:
        p = self.paths
        ports = self.ports
        argv = build_ray_start_argv(self.spec, ports, p.ray_temp, self._ray)
        return RunSpec(
            argv=argv,
            env=build_env(self.spec, p, self._ray),
            cwd=p.work,
            marker=self.marker,
            name=f"{self.spec.cluster_id}.{self.spec.member_id}",
            rw_paths=[p.root, p.ray_temp],
            hide_paths=[self.spec.base_dir],
            sweep_paths=[p.ray_temp],
            home=p.home,
            gpu_indices=self.spec.gpu_indices,
            num_cpus=self.spec.cpu_limit,
            memory_bytes=self.spec.memory_limit,
            shm_bytes=self.spec.object_store_limit,
            pids_max=self.spec.pids_max,
            disk_bytes=self.spec.disk_bytes,
            log_path=p.log,
            labels={"loom.cluster": self.spec.cluster_id, "loom.role": self.spec.role},
            netns=self.spec.netns,
        )

    async def wait_ready(self, timeout: float = 60.0) -> RayNodeInfo:
        """Wait until the node is ALIVE in the head's GCS; raise RayNodeError otherwise."""
        if self.state == "ready" and self.info is not None:
            return self.info
        if self._handle is None or self.state != "starting":
            raise RayNodeError(f"node is {self.state}, not starting")
        handle = self._handle
        probe = await self._spawn_probe(wait=timeout)
        out_task = asyncio.ensure_future(probe.communicate())
        try:
            while not out_task.done():
                if not handle.alive():
                    raise RayNodeError(
                        f"Ray node of {self.spec.member_id} exited with code "
                        f"{handle.poll()} before it was ready:\n{self.log_tail()}"
                    )
                await asyncio.wait({out_task}, timeout=0.2)
            stdout, _ = out_task.result()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                probe.kill()
            with contextlib.suppress(BaseException):
                await out_task
            self.state = "failed"
            raise
        result = _parse_probe(stdout)
        if result.get("status") == "unauthenticated":
            self.state = "failed"
            raise RayNodeError(
                f"the head at {self.gcs_address} refused the cluster token of "
                f"{self.spec.member_id} ({result.get('error')})"
            )
        if result.get("status") != "alive":
            self.state = "failed"
            raise RayNodeError(
                f"Ray node of {self.spec.member_id} not registered with the head at "
                f"{self.gcs_address} within {timeout:g}s ({result}):\n{self.log_tail()}"
            )
        self.info = self._info(str(result["node_id"]))
        self.state = "ready"
        return self.info

    def _info(self, node_id: str) -> RayNodeInfo:
        head = self.spec.role == "head"
        ports = self.ports
        return RayNodeInfo(
            node_id=node_id,
            node_ip=self.node_ip,
            gcs_address=self.gcs_address,
            ports=ports,
            dashboard_url=(
                f"http://{self.spec.dashboard_host}:{ports.dashboard}"
                if head and self.spec.include_dashboard
                else None
            ),
            client_address=f"ray://{self.node_ip}:{ports.client_server}" if head else None,
        )

    async def health(self, timeout: float = 15.0) -> NodeHealth:
        """One check: is ``ray start`` still running, and is the node ALIVE in the GCS?"""
        handle = self._handle
        if handle is None or not handle.alive():
            return NodeHealth(False, False, detail=f"node process not running ({self.state})")
        if self.spec.disk_bytes is not None:
            used = await asyncio.to_thread(disk_usage, [self.paths.root, self.paths.ray_temp])
            if used > self.spec.disk_bytes:
                return NodeHealth(
                    True,
                    False,
                    detail=f"disk quota exceeded: {used} of {self.spec.disk_bytes} bytes used",
                )
        probe = await self._spawn_probe(wait=0.0)
        try:
            stdout, _ = await asyncio.wait_for(probe.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                probe.kill()
            await probe.wait()
            return NodeHealth(True, False, detail=f"GCS at {self.gcs_address} did not answer")
        result = _parse_probe(stdout)
        alive = result.get("status") == "alive"
        node_id = result.get("node_id")
        seen = result.get("alive_ids")
        return NodeHealth(
            handle.alive(),
            alive,
            node_id=str(node_id) if node_id else None,
            detail="" if alive else f"GCS at {self.gcs_address}: {result}",
            alive_ids=tuple(str(i) for i in seen) if isinstance(seen, list) else (),
        )

    async def mark_peer_dead(
        self, ray_node_id: str, reason: str, timeout: float = 20.0
    ) -> dict[str, object]:
        """Have this head's GCS mark another node dead (:mod:`loom.agent.ray_peer`).

        Returns the module's JSON answer (``status`` ``dead`` on success)."""
        if self.spec.role != "head" or self.state != "ready":
            raise RayNodeError(f"{self.spec.member_id} is not a ready head ({self.state})")
        proc = await self._spawn_module(
            "loom.agent.ray_peer",
            [
                f"--gcs={self.gcs_address}",
                f"--node-id={ray_node_id}",
                f"--reason={reason}",
                f"--timeout={max(1.0, timeout - 5):g}",
            ],
        )
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return {"status": "unreachable", "error": f"no answer within {timeout:g}s"}
        return _parse_probe(stdout)

    async def reset_connections_to(self, ip: str) -> bool:
        """Destroy this member's TCP connections to ``ip`` (``ss -K`` in its namespace).

        A host that was cut off answers nothing, so a call in flight to it (a driver's task
        pushed to a worker there) waits for gRPC's keepalive even after the GCS lists the
        node dead; a destroyed socket fails that call at once and Ray retries the task on
        a live node. Only in the member's own namespace (never the host's)."""
        if self.spec.netns is None or shutil.which("ss") is None:
            return False
        try:
            addr = str(ipaddress.IPv4Address(ip))
        except ValueError:
            return False
        proc = await asyncio.create_subprocess_exec(
            "nsenter",
            f"--net={self.spec.netns}",
            "--",
            "ss",
            "-K",
            "dst",
            addr,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(proc.wait(), 10) == 0
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return False

    async def wait_exit(self) -> int:
        """Return the exit code of the node's process once it ends (for a watcher task)."""
        while self._handle is not None:
            code = self._handle.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.5)
        return 0

    async def stop(self, grace: float = 10.0) -> None:
        """Kill the node's whole process tree and remove its directories; idempotent.

        ``grace`` is how long a ready node's ``ray start`` gets after SIGTERM to stop its
        children (the raylet then unregisters from the GCS at once) before everything is
        SIGKILLed; a node that never became ready gets at most 2 s.
        """
        handle = self._handle
        if handle is not None:
            if self.state != "ready":
                grace = min(grace, 2.0)  # nothing registered to hand back; Ray may ignore TERM
            await asyncio.to_thread(handle.kill_tree, grace)
        # Even without a handle (failed start, recovery), nothing of the member may remain.
        await asyncio.to_thread(sweep, self.marker, [self.paths.ray_temp])
        await asyncio.to_thread(_remove_dirs, self.paths.all_dirs())
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self.state = "stopped"

    # -- helpers

    async def _spawn_probe(self, wait: float) -> asyncio.subprocess.Process:
        return await self._spawn_module(
            "loom.agent.raynode_probe",
            [
                f"--gcs={self.gcs_address}",
                f"--node-ip={self.node_ip}",
                f"--node-manager-port={self.ports.node_manager}",
                f"--wait={wait:g}",
            ],
        )

    async def _spawn_module(self, module: str, args: Sequence[str]) -> asyncio.subprocess.Process:
        """``python -m module args...`` with the cluster's token, in the member's netns."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.paths.home),
            "PYTHONPATH": os.pathsep.join([_LOOM_SRC, os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.spec.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # In the member's namespace: there the head is reachable (over the overlay, too).
        netns = ["nsenter", f"--net={self.spec.netns}", "--"] if self.spec.netns else []
        return await asyncio.create_subprocess_exec(
            *netns,
            self._python,
            "-m",
            module,
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the node's log (``ray start`` output), for error reports."""
        try:
            text = self.paths.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _parse_probe(stdout: bytes) -> dict[str, object]:
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(parsed, dict):
                return parsed
    return {"status": "unreachable", "error": "probe printed no result"}


def _remove_dirs(dirs: Sequence[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        if d.exists():
            raise RayNodeError(f"could not remove {d}")


async def cleanup_stale_members(base_dir: Path, ray_tmp_root: Path = Path("/tmp")) -> list[str]:
    """After an agent restart: kill every sandbox this agent left and remove its files.

    Returns the markers that still had processes. Call before accepting new commands.
    """
    tag = agent_tag(base_dir) + "-"
    stale = await asyncio.to_thread(find_sandboxes, tag)
    for marker in stale:
        short = marker[len(tag) :]
        await asyncio.to_thread(sweep, marker, [ray_tmp_root / f"loom-{short}"])
    members = base_dir / "members"
    dirs: list[Path] = []
    if members.is_dir():
        for child in members.iterdir():
            dirs += [child, ray_tmp_root / f"loom-{child.name}"]
    await asyncio.to_thread(_remove_dirs, dirs)
    await asyncio.to_thread(remove_stale, tag)
    return sorted(stale)
