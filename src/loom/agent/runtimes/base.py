"""What every runtime offers: run one member's command, and take it down as a whole.

A runtime turns a :class:`RunSpec` (argv, env, cwd, the directories the member may
write, the GPUs it may see) into a running process tree and a :class:`ProcessHandle`.
The handle can be waited on, and :meth:`ProcessHandle.kill_tree` takes down *every*
process the member started, whatever it did to escape its process group: each process
of a member carries the marker variable ``LOOM_SANDBOX=<marker>`` in its environment
(children inherit it), and a final sweep of ``/proc`` kills any process that still
carries it or whose command line names one of the member's private paths.

Processes must be spawned from a long-lived thread (the agent's event-loop thread):
``--die-with-parent`` and ``PR_SET_PDEATHSIG`` fire when the *thread* that forked the
child exits, not only when the process does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MARKER_ENV = "LOOM_SANDBOX"
"""Environment variable set in every process of a member; its value is the marker."""

PROC = Path("/proc")

#: PATH of the host-side helper processes (never the user's).
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SandboxError(RuntimeError):
    """A runtime could not start, or could not fully stop, a member's processes."""


class RuntimeUnavailable(SandboxError):
    """The requested runtime is not usable here; the message says why and how to fix it."""


class LeftoverProcessesError(SandboxError):
    """Some processes of a member survived SIGKILL (should not happen; reported, not hidden)."""

    def __init__(self, marker: str, pids: Sequence[int]) -> None:
        self.marker = marker
        self.pids = tuple(pids)
        super().__init__(f"processes of sandbox {marker!r} survived SIGKILL: {list(self.pids)}")


@dataclass(frozen=True)
class RunSpec:
    """One member's command and what it is allowed to touch.

    ``rw_paths`` are host directories bound read-write at the same path inside a
    sandbox (they must exist); ``ro_paths`` are host paths that must stay visible
    read-only even if they lie under a hidden directory; ``hide_paths`` are host
    directories that the sandbox replaces with an empty tmpfs (e.g. the agent's own
    data dir, which holds its keys).
    ``sweep_paths`` are private paths of the member: a process whose command line names
    one of them is the member's, and is killed by the final sweep.
    """

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path
    marker: str
    name: str
    rw_paths: Sequence[Path] = ()
    ro_paths: Sequence[Path] = ()
    hide_paths: Sequence[Path] = ()
    sweep_paths: Sequence[Path] = ()
    home: Path | None = None
    gpu_indices: Sequence[int] = ()
    num_cpus: float | None = None
    memory_bytes: int | None = None
    shm_bytes: int | None = None
    log_path: Path | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: A network namespace (``/run/netns/NAME``) to run in, instead of the host network.
    netns: Path | None = None
    #: Most processes (threads included) the member may have at once.
    pids_max: int | None = None
    #: Most bytes the member may keep in its writable directories.
    disk_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("RunSpec.argv must not be empty")
        if not self.marker or "\0" in self.marker or "=" in self.marker:
            raise ValueError(f"bad sandbox marker {self.marker!r}")

    def full_env(self) -> dict[str, str]:
        """The environment the member's command gets: its own env plus the marker and HOME."""
        env = dict(self.env)
        if self.home is not None:
            env["HOME"] = str(self.home)
        env[MARKER_ENV] = self.marker
        return env

    def host_env(self) -> dict[str, str]:
        """The fixed environment of host-side helpers (bwrap, nsenter, the docker client).

        Nothing the user sent is in it: only a PATH and the marker (for the sweep).
        """
        return {"PATH": HOST_PATH, MARKER_ENV: self.marker}


# ----------------------------------------------------------------------------- /proc


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        return (PROC / str(pid) / name).read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


def iter_pids() -> Iterator[int]:
    """Every process id visible in /proc."""
    try:
        entries = os.listdir(PROC)
    except OSError:
        return
    for entry in entries:
        if entry.isdigit():
            yield int(entry)


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc/<pid>/stat, or None if it is gone."""
    raw = _read_proc(pid, "stat")
    if raw is None:
        return None
    # The command name is in parentheses and may contain spaces: parse after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[1])
    except (IndexError, ValueError):
        return None


def is_zombie(pid: int) -> bool:
    raw = _read_proc(pid, "stat")
    if raw is None:
        return True
    rest = raw[raw.rfind(b")") + 2 :].split()
    return bool(rest) and rest[0] in (b"Z", b"X")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (scan of /proc/*/stat)."""
    return [p for p in iter_pids() if parent_pid(p) == pid]


def _ancestors_of_self() -> set[int]:
    seen: set[int] = set()
    pid: int | None = os.getpid()
    while pid and pid not in seen:
        seen.add(pid)
        pid = parent_pid(pid)
    return seen


def find_marked(marker: str, sweep_paths: Sequence[Path] = ()) -> list[int]:
    """Live processes that belong to the sandbox ``marker``.

    A process belongs to it when its environment holds ``LOOM_SANDBOX=<marker>`` or its
    command line names one of ``sweep_paths``. This process and its ancestors never match.
    """
    needle = f"{MARKER_ENV}={marker}".encode()
    paths = [str(p).encode() for p in sweep_paths]
    mine = _ancestors_of_self()
    found: list[int] = []
    for pid in iter_pids():
        if pid in mine or is_zombie(pid):
            continue
        environ = _read_proc(pid, "environ") or b""
        if needle in environ.split(b"\0"):
            found.append(pid)
            continue
        if paths:
            cmdline = _read_proc(pid, "cmdline") or b""
            if any(p in cmdline for p in paths):
                found.append(pid)
    return found


def find_sandboxes(marker_prefix: str) -> dict[str, list[int]]:
    """Markers starting with ``marker_prefix`` that still have live processes.

    For crash recovery: an agent restarting sweeps the sandboxes it left behind.
    """
    key = f"{MARKER_ENV}=".encode()
    prefix = marker_prefix.encode()
    mine = _ancestors_of_self()
    found: dict[str, list[int]] = {}
    for pid in iter_pids():
        if pid in mine or is_zombie(pid):
            continue
        for item in (_read_proc(pid, "environ") or b"").split(b"\0"):
            if item.startswith(key) and item[len(key) :].startswith(prefix):
                found.setdefault(item[len(key) :].decode(errors="replace"), []).append(pid)
                break
    return found


def sweep(marker: str, sweep_paths: Sequence[Path] = (), timeout: float = 10.0) -> None:
    """SIGKILL every process of the sandbox until none is left; raise if some survive."""
    deadline = time.monotonic() + timeout
    while True:
        pids = find_marked(marker, sweep_paths)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise LeftoverProcessesError(marker, pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


# ----------------------------------------------------------------------------- handle


class ProcessHandle:
    """A running member command: the direct child of the agent plus everything under it.

    The child is started in its own session (so in its own process group). ``kill_tree``
    sends SIGTERM to the member's main process(es), waits up to ``grace`` seconds for the
    child to exit, SIGKILLs the process group, then sweeps /proc by marker.
    """

    def __init__(self, popen: subprocess.Popen[bytes], spec: RunSpec) -> None:
        self._popen = popen
        self.spec = spec
        self.pid = popen.pid
        self.marker = spec.marker
        self._finished = False

    def poll(self) -> int | None:
        """Exit code of the direct child, or None while it runs."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        # Peek without reaping, so the process group id stays reserved until kill_tree.
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self._popen.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def alive(self) -> bool:
        return self.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the direct child to exit (without reaping it); None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def main_pids(self) -> list[int]:
        """The processes that should get the polite SIGTERM first (the member's command)."""
        return [self.pid]

    def _hard_kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def kill_tree(self, grace: float = 10.0) -> None:
        """Stop the member and every process it spawned; idempotent.

        Raises :class:`LeftoverProcessesError` if anything survives SIGKILL.
        """
        if self._finished:
            return
        if self.alive():
            for pid in self.main_pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            self.wait(grace)
        self._hard_kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5)
        sweep(self.marker, self.spec.sweep_paths)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5)
        self._finished = True

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode


# ----------------------------------------------------------------------------- runtime


class Runtime(ABC):
    """Runs members' commands. Implementations: process, bwrap, docker."""

    name: str = "abstract"
    #: True when the command runs with the host's Python environment (so the agent's
    #: own ``ray`` executable can be used); False for container images.
    uses_host_python: bool = True

    @abstractmethod
    def spawn(self, spec: RunSpec) -> ProcessHandle:
        """Start ``spec.argv``; return at once with a handle (raises SandboxError on failure)."""

    def describe(self) -> str:
        return self.name


def open_log(spec: RunSpec) -> int:
    """File descriptor the member's stdout and stderr go to (its log file or /dev/null)."""
    if spec.log_path is None:
        return os.open(os.devnull, os.O_WRONLY)
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def popen_in_new_session(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path | None,
    spec: RunSpec,
    *,
    pass_fds: Sequence[int] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Popen with stdin closed, output to the member's log, in a new session.

    ``preexec_fn`` runs in the child before exec; it must only make system calls
    (no locks, no imports): the agent has threads.
    """
    log_fd = open_log(spec)
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=None if cwd is None else str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            preexec_fn=preexec_fn,
        )
    except OSError as exc:
        raise SandboxError(f"could not start {argv[0]!r}: {exc}") from exc
    finally:
        os.close(log_fd)
