"""The bubblewrap runtime: the default sandbox on Linux.

What the member's command gets (see docs/sandbox-and-ray.md):

* an allow-listed filesystem (:mod:`loom.agent.runtimes.fsview`): system libraries, the
  interpreter and Ray read-only, its own directories read-write, private ``/tmp``,
  ``/dev`` and ``/proc``; nothing else of the host;
* its own PID and IPC namespaces (host processes are invisible and unreachable), a new
  session, no capabilities, ``no_new_privs`` and a seccomp filter
  (:mod:`loom.agent.runtimes.seccomp`);
* an unprivileged uid (:mod:`loom.agent.runtimes.identity`): with a root agent, a uid of
  its own — bwrap runs privileged (as in its setuid mode) and the command drops to that
  uid with ``setpriv`` as the sandbox's last step, so the kernel sees an unprivileged uid
  with an empty capability set; with a non-root agent, the agent's uid in an
  unprivileged user namespace;
* CPU, memory and process limits in a cgroup of its own, or rlimits
  (:mod:`loom.agent.runtimes.limits`);
* only its own environment: the user's variables go to bwrap through an inherited file
  (``--args FD``: ``--clearenv``, ``--setenv``…) and are set only for the command inside;
  the host-side bwrap (and ``nsenter``) get a fixed ``PATH`` and the marker;
* the host network, or the network namespace ``RunSpec.netns`` (entered with ``nsenter``
  before bwrap starts).

The sandbox dies with the agent (``--die-with-parent``), and killing the outer bwrap
process tears down the PID namespace, so no process of the member can outlive it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loom.agent.runtimes import fsview
from loom.agent.runtimes.base import (
    ProcessHandle,
    RunSpec,
    Runtime,
    RuntimeUnavailable,
    SandboxError,
    children_of,
    popen_in_new_session,
)
from loom.agent.runtimes.identity import UidLease, chown_tree, group_text, lease_uid, passwd_text
from loom.agent.runtimes.limits import Confinement, LimitsError, ResourceLimits, confine
from loom.agent.runtimes.seccomp import SeccompUnsupported, build_filter

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; "
    "Fedora: `sudo dnf install bubblewrap`; Arch: `sudo pacman -S bubblewrap`), "
    "or choose another runtime explicitly (`docker`, or `process` without isolation)"
)

# Kept importable from here (older callers).
NVIDIA_CONTROL_NODES = fsview.NVIDIA_CONTROL_NODES
nvidia_device_nodes = fsview.nvidia_device_nodes

#: Capabilities the sandbox keeps only until ``setpriv`` drops to the member's uid.
DROP_CAPS: tuple[str, ...] = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
#: coreutils ``env``: enters the member's work dir once the uid is dropped.
ENV_BIN = "/usr/bin/env"


@dataclass(frozen=True)
class SandboxFds:
    """File descriptors bwrap reads its inputs from (numbers as the child sees them)."""

    env: int
    seccomp: int
    passwd: int
    group: int


def sandbox_env_args(spec: RunSpec) -> list[str]:
    """``--clearenv`` and one ``--setenv`` per variable: the command's whole environment."""
    out = ["--clearenv"]
    for key, value in sorted(spec.full_env().items()):
        if "\0" in key or "\0" in value or "=" in key or not key:
            raise SandboxError(f"environment variable {key[:40]!r} cannot be set")
        out += ["--setenv", key, value]
    return out


def drop_to(uid: int, gid: int, setpriv: str) -> list[str]:
    """The prefix that runs the command as ``uid:gid`` with no capabilities left."""
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


def build_bwrap_argv(
    spec: RunSpec,
    bwrap: str = "bwrap",
    *,
    fds: SandboxFds,
    as_root: bool | None = None,
    uid: int | None = None,
    gid: int | None = None,
    setpriv: str = "/usr/bin/setpriv",
) -> list[str]:
    """The full bwrap command line for ``spec``; secrets and the env travel in ``fds``."""
    if as_root is None:
        as_root = os.geteuid() == 0
    argv = [
        bwrap,
        "--args",
        str(fds.env),
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-cgroup-try",
    ]
    if as_root:
        # Privileged bwrap (no user namespace): the command then drops to `uid`.
        argv += ["--cap-drop", "ALL"]
        for cap in DROP_CAPS:
            argv += ["--cap-add", cap]
    else:
        argv += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    plan = fsview.MountPlan()
    fsview.system_mounts(plan)
    fsview.etc_mounts(plan, fds.passwd, fds.group)
    plan.special("--proc", Path("/proc"))
    plan.special("--dev", Path("/dev"))
    plan.tmpfs(Path("/dev/shm"))
    plan.tmpfs(Path("/tmp"))
    plan.tmpfs(Path("/var/tmp"))
    ro = fsview.exposed_ro_paths(spec.ro_paths)
    for p in ro:
        plan.bind(p, p)
    # The agent's data dir (its keys) stays hidden even if it lies inside a bound path.
    for h in fsview.dedupe(Path(os.path.realpath(x)) for x in spec.hide_paths):
        if any(fsview.is_under(h, p) for p in ro):
            plan.tmpfs(h, "0755")
    rw = [*spec.rw_paths, *([spec.home] if spec.home is not None else []), spec.cwd]
    for p in fsview.dedupe(Path(x) for x in rw):
        plan.bind(p, p, rw=True)
    sys_parts = [*fsview.SYS_ALWAYS, *(fsview.SYS_WITH_GPUS if spec.gpu_indices else ())]
    for part in sys_parts:
        if Path(part).exists():
            plan.bind(Path(part), Path(part))
    for node in fsview.nvidia_device_nodes(spec.gpu_indices):
        plan.bind(node, node, dev=True)
    argv += plan.args
    argv += ["--seccomp", str(fds.seccomp)]
    if not as_root:
        return [*argv, "--chdir", str(spec.cwd), "--", *spec.argv]
    if uid is None or gid is None or uid == 0 or gid == 0:
        raise SandboxError("a root agent must give the member an unprivileged uid and gid")
    # bwrap itself holds no CAP_DAC_OVERRIDE, so it cannot enter the member's 0700 dir:
    # change into it after the drop (coreutils `env --chdir`).
    argv += ["--chdir", "/", "--", *drop_to(uid, gid, setpriv)]
    return [*argv, ENV_BIN, f"--chdir={spec.cwd}", "--", *spec.argv]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # inherited by bwrap through pass_fds
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class BwrapHandle(ProcessHandle):
    """Handle on the outer bwrap process; the member's command is its grandchild.

    Outer bwrap -> inner bwrap (PID 1 of the sandbox's PID namespace) -> command.
    Once everything is gone the member's cgroup is removed and its uid released.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        spec: RunSpec,
        confinement: Confinement,
        lease: UidLease,
    ) -> None:
        super().__init__(popen, spec)
        self.confinement = confinement
        self.lease = lease

    @property
    def uid(self) -> int:
        return self.lease.uid

    def main_pids(self) -> list[int]:
        return [pid for init in children_of(self.pid) for pid in children_of(init)]

    def kill_tree(self, grace: float = 10.0) -> None:
        try:
            super().kill_tree(grace)
        finally:
            try:
                self.confinement.remove()
            finally:
                self.lease.release()


@functools.cache
def probe_bwrap(bwrap: str = "bwrap") -> str | None:
    """None if bubblewrap is installed and can build our sandbox here, else the reason."""
    path = shutil.which(bwrap)
    if path is None:
        return f"bubblewrap (`{bwrap}`) is not installed: {INSTALL_HINT}"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "`setpriv` (util-linux) is missing: a root agent needs it to drop members' uid"
    try:
        build_filter()
    except SeccompUnsupported as exc:
        return str(exc)
    argv = [path, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"]
    argv += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]
    argv += ["--", "/bin/sh", "-c", "exit 0"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap at {path} could not run: {exc}"
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        return (
            f"bubblewrap at {path} cannot create a sandbox here ({err or done.returncode}); "
            "unprivileged user namespaces may be disabled "
            "(sysctl kernel.unprivileged_userns_clone=1, or run the agent as root)"
        )
    return None


class BwrapRuntime(Runtime):
    """Runs each member inside a bubblewrap sandbox (see the module docstring).

    ``limits`` forces the limits mechanism ("cgroup2", "cgroup1", "rlimit"); None picks
    the best one that works here.
    """

    name = "bwrap"
    uses_host_python = True

    def __init__(
        self, bwrap: str = "bwrap", *, check: bool = True, limits: str | None = None
    ) -> None:
        if check:
            reason = probe_bwrap(bwrap)
            if reason is not None:
                raise RuntimeUnavailable(reason)
        self.bwrap = shutil.which(bwrap) or bwrap
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        self.nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        self.limits_kind = limits

    def spawn(self, spec: RunSpec) -> ProcessHandle:
        rw = [*spec.rw_paths, spec.cwd, *([spec.home] if spec.home else [])]
        for p in rw:
            if not Path(p).is_dir():
                raise SandboxError(f"sandbox directory {p} does not exist")
        if spec.netns is not None and not Path(spec.netns).exists():
            raise SandboxError(f"network namespace {spec.netns} does not exist")
        lease = lease_uid(spec.marker)
        confinement: Confinement | None = None
        fds: list[int] = []
        try:
            if lease.private:
                skip = [spec.log_path] if spec.log_path is not None else []
                chown_tree([Path(p) for p in rw], lease.uid, lease.gid, skip=skip)
            limits = ResourceLimits(
                cpus=spec.num_cpus,
                memory_bytes=spec.memory_bytes,
                pids=spec.pids_max,
                disk_bytes=spec.disk_bytes,
            )
            confinement = confine(
                spec.marker, limits, private_uid=lease.private, kind=self.limits_kind
            )
            confinement.open_procs()
            env_data = "\0".join(sandbox_env_args(spec)) + "\0"
            fd_set = SandboxFds(
                env=_memfd("loom-env", env_data.encode()),
                seccomp=_memfd("loom-seccomp", build_filter()),
                passwd=_memfd("loom-passwd", passwd_text(lease.uid, lease.gid, spec.home).encode()),
                group=_memfd("loom-group", group_text(lease.gid).encode()),
            )
            fds = [fd_set.env, fd_set.seccomp, fd_set.passwd, fd_set.group]
            argv = build_bwrap_argv(
                spec, self.bwrap, fds=fd_set, uid=lease.uid, gid=lease.gid, setpriv=self.setpriv
            )
            if spec.netns is not None:  # nsenter execs bwrap: same pid, inside that network
                argv = [self.nsenter, f"--net={spec.netns}", "--", *argv]
            popen = popen_in_new_session(
                argv,
                spec.host_env(),
                None,
                spec,
                pass_fds=fds,
                preexec_fn=confinement.preexec(),
            )
        except (OSError, LimitsError, SandboxError) as exc:
            if confinement is not None:
                with contextlib.suppress(LimitsError):
                    confinement.remove(timeout=0)
            lease.release()
            if isinstance(exc, SandboxError):
                raise
            raise SandboxError(f"could not set up the sandbox of {spec.name}: {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)
            if confinement is not None:
                confinement.close_fds()
        return BwrapHandle(popen, spec, confinement, lease)


def sandbox_uid_of(handle: ProcessHandle) -> int | None:
    """The uid a bwrap member runs as (None for other runtimes)."""
    return handle.uid if isinstance(handle, BwrapHandle) else None


__all__: Sequence[str] = (
    "BwrapHandle",
    "BwrapRuntime",
    "SandboxFds",
    "build_bwrap_argv",
    "probe_bwrap",
    "sandbox_env_args",
)
