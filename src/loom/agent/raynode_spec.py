"""What a member's Ray node is: its spec, its files, its command line and environment.

Pure construction, no processes: :mod:`loom.agent.raynode` runs what this builds.

Addresses: Ray rewrites ``127.0.0.1``/``localhost`` to the machine's outward IP on Linux,
so loopback clusters use ``127.0.0.2`` (see :func:`ray_host`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loom.agent.raynode_ports import PortBlock
from loom.core.spec import check_env

Role = Literal["head", "worker"]
#: Loopback address Ray leaves alone (it rewrites 127.0.0.1, localhost and ::1).
LOOPBACK_NODE_IP = "127.0.0.2"
_REWRITTEN_BY_RAY = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,256}$")
_RESERVED_ENV = re.compile(
    r"^(RAY_AUTH_.*|LOOM_.*|CUDA_VISIBLE_DEVICES|NVIDIA_VISIBLE_DEVICES|HOME|PATH)$"
)
#: Unix socket paths are limited to 107 bytes; Ray adds up to ~70 under its temp dir.
MAX_RAY_TEMP_DIR_LEN = 36
#: Limits of a member when the command names none (see docs/sandbox-and-ray.md).
DEFAULT_MEMORY_PER_CPU = 2 << 30
MIN_MEMORY_BYTES = 2 << 30
#: Processes *and threads*: a Ray head runs several hundred threads.
DEFAULT_PIDS_MAX = 4096
DEFAULT_DISK_BYTES = 20 << 30
#: CPU quota on top of ``num_cpus`` for Ray's own daemons (GCS, raylet, dashboard):
#: with the quota at ``num_cpus`` alone a loaded head stopped answering its GCS probes.
RAY_DAEMON_CPUS = 1.0
#: Share of the memory limit given to Ray's object store (in /dev/shm, inside the limit).
OBJECT_STORE_SHARE = 0.3
#: Ray's own failure detection, tuned to a cluster on an overlay (given to the head's
#: ``ray start --system-config``; the GCS hands it to every raylet, worker and driver).
#: Ray's defaults mark a node dead only after 5 x (10 s timeout + 3 s period) = 65 s of
#: silence, and a driver notices a connection that went silent (a cut host drops packets,
#: nothing resets the TCP connection) only by gRPC keepalive after 300 s + 120 s, so its
#: tasks on that node hang for minutes. Loom's own detection (heartbeats, 11-15 s) tells the
#: head at once (``loom.agent.ray_peer``); these are the fallback and the driver's side:
#:
#: * health checks every 1 s with a 2 s timeout, dead after 5 failures in a row: a cut
#:   node is dead to the GCS within 5 x (2 + 1) = 15 s (Loom's own detection is about as
#:   fast); a false positive needs the raylet to miss five 2 s deadlines in a row, about
#:   10 s without answering a trivial RPC, far beyond the stalls of a loaded 2-core
#:   machine (it answers from gRPC's own threads, not the raylet's busy event loop);
#: * gRPC keepalive pings every 10 s with a 10 s timeout: a connection to a node that
#:   went silent is given up within ~20 s instead of ~7 min, so calls in flight to it
#:   fail and Ray retries the task elsewhere (it asks the GCS, which lists the node dead).
#:   Still well above the overlay's round trips (ms) and a loaded machine's stalls.
RAY_SYSTEM_CONFIG: dict[str, int] = {
    "health_check_initial_delay_ms": 5000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 5,
    "grpc_client_keepalive_time_ms": 10_000,
    "grpc_client_keepalive_timeout_ms": 10_000,
}


class RayNodeError(RuntimeError):
    """A member's Ray node failed to start, become ready, or stop; the message says why."""


def ray_host(host: str) -> str:
    """The address to give Ray for ``host``: loopback names become ``127.0.0.2``.

    Ray 2.x on Linux replaces 127.0.0.1/localhost/::1 — in ``--node-ip-address`` and in
    ``--address`` — by the IP of the default route's interface. Any other 127.x address
    is routed to the loopback interface by Linux and left alone by Ray.
    """
    return LOOPBACK_NODE_IP if host in _REWRITTEN_BY_RAY else host


def ray_address(address: str) -> str:
    """``host:port`` with the host passed through :func:`ray_host`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"bad Ray address {address!r}: expected host:port")
    return f"{ray_host(host)}:{port}"


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class RayNodeSpec:
    """What the coordinator asks for, plus where the agent keeps the member's files.

    ``gpu_indices`` are host GPU indices (NVML order): only their device nodes enter the
    sandbox; ``CUDA_VISIBLE_DEVICES`` is set to ``gpu_uuids`` when given (robust to
    renumbering inside a sandbox), else to the indices. ``env`` comes from the user's
    cluster spec and may not override the variables Loom controls.
    """

    cluster_id: str
    member_id: str
    role: Role
    token: str
    base_dir: Path
    head_address: str | None = None
    num_cpus: int = 1
    num_gpus: int | None = None
    gpu_indices: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    memory_bytes: int | None = None
    object_store_bytes: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    node_ip: str = LOOPBACK_NODE_IP
    include_dashboard: bool = True
    ports: PortBlock | None = None
    ray_tmp_root: Path = Path("/tmp")
    #: The member's network namespace (loom.agent.netns); None: the host network.
    netns: Path | None = None
    #: Where the head's dashboard binds: loopback on the host network, else the node's IP.
    dashboard_host: str = "127.0.0.1"
    #: Sandbox limits: processes/threads, and bytes in the member's directories.
    pids_max: int = DEFAULT_PIDS_MAX
    disk_bytes: int | None = DEFAULT_DISK_BYTES

    def __post_init__(self) -> None:
        for name in ("cluster_id", "member_id"):
            if not _ID.match(getattr(self, name)):
                raise ValueError(f"{name} must match {_ID.pattern}: {getattr(self, name)!r}")
        if self.role not in ("head", "worker"):
            raise ValueError(f"role must be head or worker, not {self.role!r}")
        if self.role == "worker" and not self.head_address:
            raise ValueError("a worker needs head_address (host:port of the head's GCS)")
        if self.head_address:
            ray_address(self.head_address)
        if not _TOKEN.match(self.token):
            raise ValueError("token must be 16-256 characters of [A-Za-z0-9_-]")
        if self.num_cpus < 1:
            raise ValueError("num_cpus must be at least 1")
        if self.gpu_uuids and len(self.gpu_uuids) != len(self.gpu_indices):
            raise ValueError("gpu_uuids must match gpu_indices one to one")
        bad = sorted(k for k in self.env if _RESERVED_ENV.match(k) or not k.isidentifier())
        if bad:
            raise ValueError(f"env may not set {', '.join(bad)} (reserved or invalid)")
        # Again on the agent, whatever the coordinator let through (loom.core.spec).
        check_env(self.env)
        if self.pids_max < 64:
            raise ValueError("pids_max must be at least 64")
        if not self.base_dir.is_absolute():
            raise ValueError("base_dir must be an absolute path")

    @property
    def gpus(self) -> int:
        return len(self.gpu_indices) if self.num_gpus is None else self.num_gpus

    @property
    def memory_limit(self) -> int:
        """The member's memory limit: as given, else 2 GiB per CPU (at least 2 GiB)."""
        if self.memory_bytes is not None:
            return self.memory_bytes
        return max(MIN_MEMORY_BYTES, DEFAULT_MEMORY_PER_CPU * self.num_cpus)

    @property
    def cpu_limit(self) -> float:
        """The member's CPU quota in cores: its ``num_cpus`` plus Ray's daemons."""
        return float(self.num_cpus) + RAY_DAEMON_CPUS

    @property
    def object_store_limit(self) -> int:
        """Ray's object store: as given, else a share of the memory limit."""
        if self.object_store_bytes is not None:
            return self.object_store_bytes
        return int(self.memory_limit * OBJECT_STORE_SHARE)


def agent_tag(base_dir: Path) -> str:
    """Short tag of one agent (its base dir): markers of its members start with it."""
    return "loom-" + hashlib.sha256(str(base_dir.resolve()).encode()).hexdigest()[:6]


def member_short_id(spec: RayNodeSpec) -> str:
    key = f"{spec.base_dir.resolve()}\0{spec.cluster_id}\0{spec.member_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class MemberPaths:
    """A member's files: ``root`` under the agent's base dir, Ray's temp dir under /tmp."""

    root: Path
    home: Path
    work: Path
    tmp: Path
    log: Path
    ray_temp: Path

    @classmethod
    def for_spec(cls, spec: RayNodeSpec) -> MemberPaths:
        short = member_short_id(spec)
        root = spec.base_dir / "members" / short
        ray_temp = spec.ray_tmp_root / f"loom-{short}"
        if len(str(ray_temp)) > MAX_RAY_TEMP_DIR_LEN:
            raise ValueError(
                f"Ray temp dir {ray_temp} is too long for Ray's unix sockets "
                f"(max {MAX_RAY_TEMP_DIR_LEN} characters): choose a shorter ray_tmp_root"
            )
        return cls(
            root=root,
            home=root / "home",
            work=root / "work",
            # TMPDIR must be short too: Python's multiprocessing (the dashboard) binds
            # AF_UNIX sockets under it, and those paths are limited to 107 bytes.
            tmp=ray_temp / "tmp",
            log=root / "ray-node.log",
            ray_temp=ray_temp,
        )

    def all_dirs(self) -> list[Path]:
        return [self.root, self.ray_temp]


def default_ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if found is None:
        raise RayNodeError("the `ray` executable is not installed next to the agent's Python")
    return found


def build_ray_start_argv(
    spec: RayNodeSpec, ports: PortBlock, ray_temp: Path, ray: str = "ray"
) -> list[str]:
    """The ``ray start --block`` command line for a member (pure; holds no secret)."""
    argv = [
        ray,
        "start",
        "--block",
        "--disable-usage-stats",
        "--log-style=record",
        "--log-color=false",
        f"--temp-dir={ray_temp}",
        f"--node-ip-address={ray_host(spec.node_ip)}",
        f"--num-cpus={spec.num_cpus}",
        f"--num-gpus={spec.gpus}",
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--metrics-export-port={ports.metrics_export}",
    ]
    # Within the sandbox's memory limit (Ray would size it from the host's memory).
    argv.append(f"--object-store-memory={spec.object_store_limit}")
    if spec.role == "head":
        argv += [
            "--head",
            f"--port={ports.gcs}",
            f"--ray-client-server-port={ports.client_server}",
            f"--include-dashboard={'true' if spec.include_dashboard else 'false'}",
            f"--dashboard-host={spec.dashboard_host}",
            f"--dashboard-port={ports.dashboard}",
            f"--system-config={json.dumps(RAY_SYSTEM_CONFIG, sort_keys=True)}",
        ]
    else:
        assert spec.head_address is not None
        argv.append(f"--address={ray_address(spec.head_address)}")
    return argv


def build_env(spec: RayNodeSpec, paths: MemberPaths, ray: str) -> dict[str, str]:
    """The node's environment: user env, then what Loom controls (token, GPUs, paths)."""
    env = dict(spec.env)
    bin_dirs = [str(Path(ray).parent)] if os.path.isabs(ray) else []
    env["PATH"] = os.pathsep.join([*bin_dirs, "/usr/local/bin", "/usr/bin", "/bin"])
    env.setdefault("LANG", "C.UTF-8")
    env["TMPDIR"] = str(paths.tmp)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = spec.token
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"  # `ray start` output reaches the member's log at once
    # No Prometheus exporter: its port takes no token and binds every interface.
    env["RAY_enable_metrics_collection"] = "0"
    if spec.gpu_indices:
        ids = spec.gpu_uuids or tuple(str(i) for i in spec.gpu_indices)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["LOOM_CLUSTER_ID"] = spec.cluster_id
    env["LOOM_MEMBER_ID"] = spec.member_id
    return env
