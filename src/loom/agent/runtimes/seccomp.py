"""A seccomp filter for members' sandboxes, compiled to classic BPF in pure Python.

bubblewrap loads it with ``--seccomp FD`` right before it execs the member's command, so
bwrap's own setup is unaffected. The filter checks the architecture first (anything but
the agent's native one — x32, i386 via ``int 0x80``, arm32 compat — is refused), then
refuses with ``EPERM`` the calls a job never needs and an escape does:

* namespaces: ``unshare`` and ``clone`` with any ``CLONE_NEW*`` flag, ``setns``;
  ``clone3`` answers ``ENOSYS`` (its flags live in memory a filter cannot read), so libc
  falls back to ``clone``, which is checked;
* other processes' memory: ``ptrace``, ``process_vm_readv``/``writev``, ``kcmp``,
  ``pidfd_getfd``;
* mounts: ``mount``, ``umount2``, ``pivot_root``, ``move_mount``, ``fsopen``, ``fsconfig``,
  ``fsmount``, ``fspick``, ``open_tree``, ``mount_setattr``;
* the kernel keyring, ``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring``;
* kernel modules, ``kexec``, ``reboot``, swap, ``acct``, ``quotactl``, ``syslog``,
  ``open_by_handle_at``, ``iopl``/``ioperm``, ``lookup_dcookie``;
* ``personality`` except the harmless values (query, ``PER_LINUX``, ``PER_LINUX32``,
  ``UNAME26``), as Docker's default profile does.

Everything else is allowed. :func:`docker_profile` renders the same policy as a Docker
seccomp JSON profile.
"""

from __future__ import annotations

import os
import platform
import struct
from dataclasses import dataclass

# -- BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

# -- seccomp (linux/seccomp.h)
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
EPERM = 1
ENOSYS = 38

_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG0_LOW = 16  # args[0], low 32 bits (little-endian)

X32_SYSCALL_BIT = 0x40000000

#: ``CLONE_NEW*`` flags that ``clone`` can take (``CLONE_NEWTIME`` overlaps the exit signal).
CLONE_NS_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
UNSHARE_NS_FLAGS = CLONE_NS_FLAGS | 0x00000080  # + CLONE_NEWTIME
#: personality() values Docker allows: PER_LINUX, PER_LINUX32, UNAME26 (+32), query.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


@dataclass(frozen=True)
class Arch:
    name: str
    audit: int  # AUDIT_ARCH_*
    syscalls: dict[str, int]
    x32: bool = False
    docker: str = ""


# Numbers from the kernel's uapi headers (asm/unistd_64.h, asm-generic/unistd.h).
_X86_64 = {
    "unshare": 272, "clone": 56, "clone3": 435, "setns": 308,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "pidfd_getfd": 438,
    "mount": 165, "umount2": 166, "pivot_root": 155, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "open_tree": 428, "mount_setattr": 442,
    "keyctl": 250, "add_key": 248, "request_key": 249,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "kexec_load": 246, "kexec_file_load": 320,
    "init_module": 175, "finit_module": 313, "delete_module": 176,
    "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163, "quotactl": 179,
    "syslog": 103, "open_by_handle_at": 304, "iopl": 172, "ioperm": 173,
    "lookup_dcookie": 212, "personality": 135,
}  # fmt: skip
_AARCH64 = {
    "unshare": 97, "clone": 220, "clone3": 435, "setns": 268,
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
    "kcmp": 272, "pidfd_getfd": 438,
    "mount": 40, "umount2": 39, "pivot_root": 41, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "open_tree": 428, "mount_setattr": 442,
    "keyctl": 219, "add_key": 217, "request_key": 218,
    "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "kexec_load": 104, "kexec_file_load": 294,
    "init_module": 105, "finit_module": 273, "delete_module": 106,
    "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89, "quotactl": 60,
    "syslog": 116, "open_by_handle_at": 265, "lookup_dcookie": 18, "personality": 92,
}  # fmt: skip

ARCHES: dict[str, Arch] = {
    "x86_64": Arch("x86_64", 0xC000003E, _X86_64, x32=True, docker="SCMP_ARCH_X86_64"),
    "aarch64": Arch("aarch64", 0xC00000B7, _AARCH64, docker="SCMP_ARCH_AARCH64"),
}
_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

#: Calls refused outright; ``clone``/``unshare``/``personality`` are checked by argument.
_ARG_CHECKED = ("clone", "unshare", "personality", "clone3")


def denied_names(arch: Arch) -> list[str]:
    return [n for n in arch.syscalls if n not in _ARG_CHECKED]


class SeccompUnsupported(RuntimeError):
    """No filter is defined for this machine's architecture."""


def native_arch() -> Arch:
    machine = platform.machine().lower()
    machine = _ALIASES.get(machine, machine)
    try:
        return ARCHES[machine]
    except KeyError:
        raise SeccompUnsupported(
            f"no seccomp filter for architecture {machine!r} (supported: {', '.join(ARCHES)})"
        ) from None


class _Asm:
    """A tiny forward-jump assembler for classic BPF."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def emit(self, code: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.ins.append((code, jt, jf, k))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.ins):
            offs = []
            for target in (jt, jf):
                if isinstance(target, str):
                    off = self.labels[target] - pc - 1
                else:
                    assert isinstance(target, int)
                    off = target
                if not 0 <= off <= 255:
                    raise ValueError(f"BPF jump out of range at {pc}: {off}")
                offs.append(off)
            out += struct.pack("=HBBI", code, offs[0], offs[1], k & 0xFFFFFFFF)
        return bytes(out)


def build_filter(arch: Arch | None = None) -> bytes:
    """The compiled filter (an array of ``struct sock_filter``) for ``arch`` (default: native)."""
    arch = arch or native_arch()
    nr = arch.syscalls
    a = _Asm()
    a.emit(_LD_W_ABS, _OFF_ARCH)
    a.emit(_JEQ_K, arch.audit, 0, "eperm")
    a.emit(_LD_W_ABS, _OFF_NR)
    if arch.x32:
        a.emit(_JGE_K, X32_SYSCALL_BIT, "eperm", 0)
    for name in denied_names(arch):
        a.emit(_JEQ_K, nr[name], "eperm", 0)
    a.emit(_JEQ_K, nr["clone3"], "enosys", 0)
    a.emit(_JEQ_K, nr["clone"], "clone", 0)
    a.emit(_JEQ_K, nr["unshare"], "unshare", 0)
    a.emit(_JEQ_K, nr["personality"], "personality", 0)
    a.emit(_RET_K, RET_ALLOW)
    a.label("clone")
    a.emit(_LD_W_ABS, _OFF_ARG0_LOW)
    a.emit(_JSET_K, CLONE_NS_FLAGS, "eperm", "allow")
    a.label("unshare")
    a.emit(_LD_W_ABS, _OFF_ARG0_LOW)
    a.emit(_JSET_K, UNSHARE_NS_FLAGS, "eperm", "allow")
    a.label("personality")
    a.emit(_LD_W_ABS, _OFF_ARG0_LOW)
    for value in PERSONALITY_ALLOWED:
        a.emit(_JEQ_K, value, "allow", 0)
    a.label("eperm")
    a.emit(_RET_K, RET_ERRNO | EPERM)
    a.label("enosys")
    a.emit(_RET_K, RET_ERRNO | ENOSYS)
    a.label("allow")
    a.emit(_RET_K, RET_ALLOW)
    return a.assemble()


def filter_fd(program: bytes | None = None) -> int:
    """A memfd holding the compiled filter, positioned at 0 (for ``bwrap --seccomp FD``)."""
    data = build_filter() if program is None else program
    fd = os.memfd_create("loom-seccomp", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def docker_profile(arch: Arch | None = None) -> dict[str, object]:
    """The same policy as a Docker seccomp profile (``--security-opt seccomp=FILE``)."""
    arch = arch or native_arch()
    errno = {"action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}
    rules: list[dict[str, object]] = [{"names": denied_names(arch), **errno}]
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    for name, mask in (("clone", CLONE_NS_FLAGS), ("unshare", UNSHARE_NS_FLAGS)):
        # One rule per flag: refused when (arg0 & flag) == flag.
        for bit in range(32):
            flag = 1 << bit
            if mask & flag:
                arg = {"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
                rules.append({"names": [name], "args": [arg], **errno})
    # personality: refused unless one of the allowed values (SCMP_CMP_NE on each).
    not_allowed = [{"index": 0, "value": v, "op": "SCMP_CMP_NE"} for v in PERSONALITY_ALLOWED]
    rules.append({"names": ["personality"], "args": not_allowed, **errno})
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [arch.docker],
        "syscalls": rules,
    }
