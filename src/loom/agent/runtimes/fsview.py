"""What of the host filesystem a bubblewrap sandbox sees: an allow-list.

Read-only: the system directories (``/usr`` and the ``/bin``, ``/sbin``, ``/lib*``
links or directories), a minimal ``/etc`` (name resolution, certificates, the dynamic
loader's cache, time zone; ``passwd``/``group`` generated for the sandbox user), the Python
installation and its venv (``sys.prefix``/``base_prefix`` and their real paths — Ray lives
in the venv's site-packages), ``/sys/devices/system/cpu``, and ``ro_paths``.
Read-write: the member's own directories (``rw_paths``, ``home``, ``cwd``).
Private and empty: ``/tmp``, ``/var/tmp``, ``/dev`` (minimal, plus the allocated
``/dev/nvidia*``), ``/proc`` of its own PID namespace.

Nothing else exists inside: no ``/home``, ``/root``, ``/srv``, ``/mnt``, ``/media``,
``/var``, ``/opt`` (unless Python lives there — then only that directory), ``/run``, the
agent's data dir, other members' directories. Parent directories of a bound path are
created empty (mode 0755) so the unprivileged uid can traverse them; they show names only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

#: System directories: bound read-only, or recreated as the same symlink.
SYSTEM_DIRS: tuple[str, ...] = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

#: What of /etc a process needs (those that exist are bound read-only, links resolved).
ETC_ALLOWED: tuple[str, ...] = (
    "resolv.conf",
    "hosts",
    "host.conf",
    "nsswitch.conf",
    "gai.conf",
    "protocols",
    "services",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "crypto-policies",
    "alternatives",
    "mime.types",
    "os-release",
    "debian_version",
)

#: NVIDIA control nodes a CUDA process needs besides its /dev/nvidiaN.
NVIDIA_CONTROL_NODES: tuple[str, ...] = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
    "/dev/nvidia-caps",
)

#: /sys parts bound read-only: CPU topology always; PCI devices for NVML with GPUs.
SYS_ALWAYS: tuple[str, ...] = ("/sys/devices/system/cpu",)
SYS_WITH_GPUS: tuple[str, ...] = ("/sys/devices", "/sys/bus/pci", "/sys/module/nvidia")


def is_under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def dedupe(paths: Iterable[Path]) -> list[Path]:
    seen: list[Path] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return seen


def python_paths() -> list[Path]:
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


def nvidia_device_nodes(gpu_indices: Sequence[int], dev: Path = Path("/dev")) -> list[Path]:
    """The device nodes a member with these GPUs may see (only those that exist)."""
    if not gpu_indices:
        return []
    wanted = [dev / f"nvidia{i}" for i in sorted(set(gpu_indices))]
    wanted += [dev / Path(p).name for p in NVIDIA_CONTROL_NODES]
    return [p for p in wanted if p.exists()]


class MountPlan:
    """bwrap arguments for the allow-list, in order (later mounts go on top)."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._made: set[Path] = {Path("/")}
        self._system = [Path(s) for s in SYSTEM_DIRS]

    def parents(self, dest: Path) -> None:
        """Create the missing parents of ``dest`` as traversable empty directories."""
        for parent in reversed(dest.parents):
            if parent in self._made or any(is_under(parent, s) for s in self._system):
                continue
            self.args += ["--perms", "0755", "--dir", str(parent)]
            self._made.add(parent)

    def dir(self, dest: Path, mode: str = "0755") -> None:
        self.parents(dest)
        if dest not in self._made:
            self.args += ["--perms", mode, "--dir", str(dest)]
            self._made.add(dest)

    def bind(self, src: Path, dest: Path, *, rw: bool = False, dev: bool = False) -> None:
        self.parents(dest)
        flag = "--dev-bind" if dev else ("--bind" if rw else "--ro-bind")
        self.args += [flag, str(src), str(dest)]
        self._made.add(dest)

    def special(self, flag: str, dest: Path) -> None:
        """``--proc`` or ``--dev`` at ``dest``."""
        self.parents(dest)
        self.args += [flag, str(dest)]
        self._made.add(dest)

    def tmpfs(self, dest: Path, mode: str = "1777") -> None:
        self.parents(dest)
        self.args += ["--perms", mode, "--tmpfs", str(dest)]
        self._made.add(dest)

    def data(self, fd: int, dest: Path, mode: str = "0644") -> None:
        self.parents(dest)
        self.args += ["--perms", mode, "--ro-bind-data", str(fd), str(dest)]


def system_mounts(plan: MountPlan) -> None:
    for name in SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            plan.args += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            plan.bind(path, path)


def etc_mounts(plan: MountPlan, passwd_fd: int, group_fd: int, etc: Path = Path("/etc")) -> None:
    plan.dir(Path("/etc"))
    for name in ETC_ALLOWED:
        src = etc / name
        if src.exists():
            plan.bind(Path(os.path.realpath(src)), Path("/etc") / name)
    plan.data(passwd_fd, Path("/etc/passwd"))
    plan.data(group_fd, Path("/etc/group"))


def exposed_ro_paths(ro_paths: Sequence[Path]) -> list[Path]:
    """Host paths bound read-only besides the system: Python, its venv, ``ro_paths``."""
    system = [Path(s) for s in SYSTEM_DIRS]
    wanted = [*python_paths(), *(Path(os.path.realpath(p)) for p in ro_paths)]
    out: list[Path] = []
    for p in dedupe(wanted):
        if not p.exists() or any(is_under(p, s) for s in system):
            continue
        out.append(p)
    # A path inside another bound one is already visible.
    return [p for p in out if not any(q != p and is_under(p, q) for q in out)]
