"""Resource limits of one member: cgroup v2, cgroup v1, or rlimits — behind one interface.

:func:`confine` creates the member's cgroup (named after its marker) and returns a
:class:`Confinement`. The runtime opens the cgroup's ``cgroup.procs`` files in the agent
and the child writes its own pid into them before it execs the sandbox (see
:meth:`Confinement.preexec`), so the sandbox and everything it ever forks are inside the
cgroup from their first instruction. :meth:`Confinement.remove` deletes the cgroup once
the member's processes are gone.

Which applies (stated in docs/sandbox-and-ray.md):

* **cgroup v2** (``/sys/fs/cgroup/cgroup.controllers`` lists cpu, memory and pids and the
  agent may write there): ``<root>/loom/<marker>`` with ``memory.max`` (and
  ``memory.swap.max = 0``), ``pids.max``, ``cpu.max``;
* **cgroup v1** (``memory``, ``pids`` and ``cpu`` hierarchies mounted and writable): one
  child of the agent's own cgroup per controller, ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes`` where swap is accounted), ``pids.max``,
  ``cpu.cfs_quota_us``;
* **rlimits** otherwise: ``RLIMIT_AS`` per process for memory (coarse: Ray reserves
  virtual memory generously), no CPU bound beyond Ray's own ``--num-cpus``.

In every mode: ``RLIMIT_NPROC`` = ``pids`` when the member has a uid of its own (it counts
that uid's processes only), ``RLIMIT_FSIZE`` = the disk quota (no single file larger) and
no core dumps. The disk quota as a whole is checked by :func:`disk_usage` (the agent's
health check stops a member over it).

A member over its memory limit is OOM-killed by the kernel inside its own cgroup; one
over its process limit cannot fork. The agent and other members are unaffected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
V2_CONTROLLERS = ("cpu", "memory", "pids")
V1_CONTROLLERS = ("memory", "pids", "cpu")


class LimitsError(RuntimeError):
    """The member's limits could not be set up; the message says why."""


@dataclass(frozen=True)
class ResourceLimits:
    """What one member may use. None: not limited by Loom."""

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    disk_bytes: int | None = None


@dataclass
class Confinement:
    """One member's cgroup (or none, for rlimits): set up, join, remove."""

    kind: str  # "cgroup2" | "cgroup1" | "rlimit"
    limits: ResourceLimits
    dirs: list[Path] = field(default_factory=list)
    rlimits: list[tuple[int, int]] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)

    def open_procs(self) -> None:
        """Open each cgroup's ``cgroup.procs`` (in the agent, before forking)."""
        self.close_fds()
        for d in self.dirs:
            self._fds.append(os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))

    def close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def preexec(self) -> Callable[[], None]:
        """What the child runs before exec: join the cgroups, set the rlimits.

        Only system calls (safe in a child forked from a threaded process).
        """
        fds = list(self._fds)
        limits = list(self.rlimits)
        setrlimit = resource.setrlimit
        write = os.write

        def run() -> None:
            for fd in fds:
                write(fd, b"0")  # "0": the writing process itself
            for which, value in limits:
                setrlimit(which, (value, value))

        return run

    def remove(self, timeout: float = 5.0) -> None:
        """Delete the member's cgroups (waits while the last processes exit)."""
        self.close_fds()
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        break
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise LimitsError(f"could not remove cgroup {d}: {exc}") from exc
                    time.sleep(0.05)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for memory in this cgroup so far."""
        for d in self.dirs:
            for name in ("memory.events", "memory.oom_control"):
                with contextlib.suppress(OSError):
                    for line in (d / name).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            return int(value)
        return 0


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise LimitsError(f"could not write {value!r} to {path}: {exc}") from exc


def _own_cgroup_v1(controller: str) -> str:
    """The agent's own cgroup path in the v1 hierarchy of ``controller``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    return "/"


def _v2_usable(root: Path) -> bool:
    try:
        have = set((root / "cgroup.controllers").read_text().split())
    except OSError:
        return False
    return set(V2_CONTROLLERS) <= have and os.access(root, os.W_OK)


def _v1_usable(root: Path) -> bool:
    return all(
        (root / c / "cgroup.procs").exists() and os.access(root / c, os.W_OK)
        for c in V1_CONTROLLERS
    )


def _enable_v2(parent: Path) -> None:
    control = parent / "cgroup.subtree_control"
    enabled = set(control.read_text().split())
    missing = [c for c in V2_CONTROLLERS if c not in enabled]
    if missing:
        _write(control, " ".join(f"+{c}" for c in missing))


def _setup_v2(root: Path, name: str, limits: ResourceLimits) -> list[Path]:
    base = root / "loom"
    _enable_v2(root)
    base.mkdir(exist_ok=True)
    _enable_v2(base)
    d = base / name
    d.mkdir(exist_ok=True)
    if limits.memory_bytes is not None:
        _write(d / "memory.max", str(limits.memory_bytes))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
    if limits.pids is not None:
        _write(d / "pids.max", str(limits.pids))
    if limits.cpus is not None:
        _write(d / "cpu.max", f"{max(1000, round(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")
    return [d]


def _setup_v1(root: Path, name: str, limits: ResourceLimits) -> list[Path]:
    dirs: list[Path] = []
    for controller in V1_CONTROLLERS:
        parent = root / controller / _own_cgroup_v1(controller).lstrip("/")
        d = parent / name
        d.mkdir(exist_ok=True)
        dirs.append(d)
        if controller == "memory" and limits.memory_bytes is not None:
            _write(d / "memory.limit_in_bytes", str(limits.memory_bytes))
            memsw = d / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                _write(memsw, str(limits.memory_bytes))
        if controller == "pids" and limits.pids is not None:
            _write(d / "pids.max", str(limits.pids))
        if controller == "cpu" and limits.cpus is not None:
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(quota))
    return dirs


def detect(root: Path = CGROUP_ROOT) -> str:
    """Which mechanism :func:`confine` would use here."""
    if _v2_usable(root):
        return "cgroup2"
    if _v1_usable(root):
        return "cgroup1"
    return "rlimit"


def confine(
    name: str,
    limits: ResourceLimits,
    *,
    private_uid: bool,
    root: Path = CGROUP_ROOT,
    kind: str | None = None,
) -> Confinement:
    """Set up the limits of the member ``name`` (its marker); see the module docstring."""
    kind = kind or detect(root)
    conf = Confinement(kind=kind, limits=limits)
    try:
        if kind == "cgroup2":
            conf.dirs = _setup_v2(root, name, limits)
        elif kind == "cgroup1":
            conf.dirs = _setup_v1(root, name, limits)
        elif kind != "rlimit":
            raise ValueError(f"unknown limits kind {kind!r}")
    except (OSError, LimitsError) as exc:
        with contextlib.suppress(LimitsError):
            conf.remove(timeout=0)
        raise LimitsError(f"could not set up {kind} limits for {name}: {exc}") from exc
    conf.rlimits = [(resource.RLIMIT_CORE, 0)]
    if limits.disk_bytes is not None:
        conf.rlimits.append((resource.RLIMIT_FSIZE, limits.disk_bytes))
    if limits.pids is not None and private_uid:
        conf.rlimits.append((resource.RLIMIT_NPROC, limits.pids))
    if kind == "rlimit" and limits.memory_bytes is not None:
        conf.rlimits.append((resource.RLIMIT_AS, limits.memory_bytes))
    return conf


def disk_usage(paths: Sequence[Path]) -> int:
    """Bytes allocated on disk under ``paths`` (files counted once, links not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in paths:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, name))
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_blocks * 512
    return total


def remove_stale(prefix: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Remove the cgroups of members named ``prefix...`` left by a crashed agent.

    Call once their processes are gone; returns the cgroups removed.
    """
    parents = [root / "loom"]
    parents += [root / c / _own_cgroup_v1(c).lstrip("/") for c in V1_CONTROLLERS]
    removed: list[Path] = []
    for parent in parents:
        with contextlib.suppress(OSError):
            for d in parent.iterdir():
                if d.is_dir() and d.name.startswith(prefix):
                    Confinement(kind="stale", limits=ResourceLimits(), dirs=[d]).remove()
                    removed.append(d)
    return removed
