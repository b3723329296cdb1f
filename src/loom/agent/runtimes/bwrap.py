"""The bubblewrap runtime: the default sandbox on Linux.

What the member's command sees (see docs/sandbox-and-ray.md):

* the host's root filesystem, read-only;
* empty private tmpfs over ``/tmp``, ``/var/tmp``, ``/home``, ``/root``, ``/run`` and any
  ``hide_paths`` (the agent's data dir, with its keys) — then its own directories bound
  read-write at the same paths, and the Python installation bound back read-only if it
  lived under a hidden directory;
* a fresh ``/proc`` of its own PID namespace (it cannot see or signal host processes),
  a minimal ``/dev`` (null, zero, random, urandom, tty, pts, shm) plus only the allocated
  ``/dev/nvidiaN`` nodes and, when it has GPUs, ``nvidiactl``/``nvidia-uvm``;
* a private IPC namespace, a new terminal session, all capabilities dropped;
* the **host network**: Ray needs it (other nodes connect to this node's raylet, object
  manager and worker ports directly), so the network namespace is shared.

The sandbox dies with the agent (``--die-with-parent``), and killing the outer bwrap
process tears down the PID namespace, so no process of the member can outlive it.
Memory and CPU are not limited by this runtime (no cgroups); Ray's own resource
accounting (``--num-cpus``, ``--object-store-memory``) applies.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from loom.agent.runtimes.base import (
    ProcessHandle,
    RunSpec,
    Runtime,
    RuntimeUnavailable,
    SandboxError,
    children_of,
    popen_in_new_session,
)

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; "
    "Fedora: `sudo dnf install bubblewrap`; Arch: `sudo pacman -S bubblewrap`), "
    "or choose another runtime explicitly (`docker`, or `process` without isolation)"
)

#: Host directories replaced by an empty tmpfs inside the sandbox (when they exist).
HIDDEN_BY_DEFAULT: tuple[str, ...] = ("/tmp", "/var/tmp", "/home", "/root", "/run", "/mnt")

#: NVIDIA control nodes a CUDA process needs besides its /dev/nvidiaN.
NVIDIA_CONTROL_NODES: tuple[str, ...] = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
    "/dev/nvidia-caps",
)


def _is_under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _python_paths() -> list[Path]:
    """Directories of this Python installation (the venv and the interpreter it links to)."""
    paths = {
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.exec_prefix),
        Path(os.path.realpath(sys.prefix)),
        Path(os.path.realpath(sys.base_prefix)),
        Path(os.path.realpath(sys.executable)).parent.parent,
    }
    return sorted(p for p in paths if p.exists())


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    seen: list[Path] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return seen


def nvidia_device_nodes(gpu_indices: Sequence[int], dev: Path = Path("/dev")) -> list[Path]:
    """The device nodes a member with these GPUs may see (only those that exist)."""
    if not gpu_indices:
        return []
    wanted = [dev / f"nvidia{i}" for i in sorted(set(gpu_indices))]
    wanted += [dev / Path(p).name for p in NVIDIA_CONTROL_NODES]
    return [p for p in wanted if p.exists()]


def build_bwrap_argv(
    spec: RunSpec, bwrap: str = "bwrap", *, as_root: bool | None = None
) -> list[str]:
    """The full bwrap command line for ``spec`` (no secrets: the env goes via the process)."""
    if as_root is None:
        as_root = os.geteuid() == 0
    argv = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-cgroup-try",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    if as_root:
        argv += ["--cap-drop", "ALL"]
    hidden = _dedupe(
        [Path(h) for h in HIDDEN_BY_DEFAULT] + [Path(os.path.realpath(h)) for h in spec.hide_paths]
    )
    hidden = [h for h in hidden if h.is_dir() and not h.is_symlink()]
    for h in hidden:
        argv += ["--tmpfs", str(h)]
    # Bring back, read-only, what the command needs from hidden places.
    keep_ro = list(_python_paths()) + [Path(p) for p in spec.ro_paths]
    resolv = Path(os.path.realpath("/etc/resolv.conf"))
    if resolv.exists():
        keep_ro.append(resolv)
    for p in _dedupe(keep_ro):
        if p.exists() and any(_is_under(p, h) for h in hidden):
            argv += ["--ro-bind", str(p), str(p)]
    rw = [*spec.rw_paths]
    if spec.home is not None:
        rw.append(spec.home)
    rw.append(spec.cwd)
    for p in _dedupe(Path(x) for x in rw):
        argv += ["--bind", str(p), str(p)]
    for node in nvidia_device_nodes(spec.gpu_indices):
        argv += ["--dev-bind", str(node), str(node)]
    argv += ["--chdir", str(spec.cwd), "--", *spec.argv]
    return argv


class BwrapHandle(ProcessHandle):
    """Handle on the outer bwrap process; the member's command is its grandchild.

    Outer bwrap -> inner bwrap (PID 1 of the sandbox's PID namespace) -> command.
    """

    def main_pids(self) -> list[int]:
        return [pid for init in children_of(self.pid) for pid in children_of(init)]


@functools.cache
def probe_bwrap(bwrap: str = "bwrap") -> str | None:
    """None if bubblewrap is installed and can build our sandbox here, else the reason."""
    path = shutil.which(bwrap)
    if path is None:
        return f"bubblewrap (`{bwrap}`) is not installed: {INSTALL_HINT}"
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
    """Runs each member inside a bubblewrap sandbox (see the module docstring)."""

    name = "bwrap"
    uses_host_python = True

    def __init__(self, bwrap: str = "bwrap", *, check: bool = True) -> None:
        if check:
            reason = probe_bwrap(bwrap)
            if reason is not None:
                raise RuntimeUnavailable(reason)
        self.bwrap = shutil.which(bwrap) or bwrap

    def spawn(self, spec: RunSpec) -> ProcessHandle:
        for p in [*spec.rw_paths, spec.cwd, *([spec.home] if spec.home else [])]:
            if not Path(p).is_dir():
                raise SandboxError(f"sandbox directory {p} does not exist")
        argv = build_bwrap_argv(spec, self.bwrap)
        if spec.netns is not None:  # nsenter execs bwrap: same pid, inside that network
            argv = ["nsenter", f"--net={spec.netns}", *argv]
        popen = popen_in_new_session(argv, spec.full_env(), None, spec)
        return BwrapHandle(popen, spec)
