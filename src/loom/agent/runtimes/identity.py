"""The unprivileged uid a member runs as.

When the agent is root, each member gets a uid/gid of its own from a high range that no
distribution hands out (:data:`UID_BASE` ...), with no ``/etc/passwd`` entry on the host:
the sandbox gets a generated ``/etc/passwd`` naming it ``loom``. The uid is leased with
an ``flock`` on ``<lock dir>/<uid>.lock`` for the member's lifetime, so several agents on
one machine never hand out the same one, and the kernel frees the lease if the agent
dies. The member's directories are chowned to it.

When the agent is not root, members run as the agent's own uid (bubblewrap then maps it
inside an unprivileged user namespace); run such an agent as a dedicated user.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

UID_BASE = 1_100_000_000
UID_COUNT = 1_000_000
LOCK_DIR = Path("/run/loom-sandbox-uids")
SANDBOX_USER = "loom"


class UidExhausted(RuntimeError):
    """Every sandbox uid of the range is leased (should not happen)."""


@dataclass
class UidLease:
    """A member's uid/gid; ``private`` when it is its own (agent is root)."""

    uid: int
    gid: int
    private: bool
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def lease_uid(marker: str, lock_dir: Path = LOCK_DIR) -> UidLease:
    """A uid for the member ``marker``: its own when the agent is root, else the agent's."""
    if os.geteuid() != 0:
        return UidLease(os.getuid(), os.getgid(), private=False)
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    start = int.from_bytes(hashlib.sha256(marker.encode()).digest()[:4], "big") % UID_COUNT
    for i in range(UID_COUNT):
        uid = UID_BASE + (start + i) % UID_COUNT
        fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return UidLease(uid, uid, private=True, _fd=fd)
    raise UidExhausted(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")


def chown_tree(paths: Iterable[Path], uid: int, gid: int, skip: Iterable[Path] = ()) -> None:
    """Give ``paths`` and everything under them to ``uid:gid`` (symlinks not followed)."""
    skipped = {os.path.realpath(p) for p in skip}
    for top in paths:
        os.chown(top, uid, gid, follow_symlinks=False)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                if os.path.realpath(path) not in skipped:
                    os.chown(path, uid, gid, follow_symlinks=False)


def passwd_text(uid: int, gid: int, home: Path | None) -> str:
    """``/etc/passwd`` of the sandbox: root, the sandbox user, nobody."""
    lines = ["root:x:0:0:root:/nonexistent:/usr/sbin/nologin"]
    if uid != 0:
        lines.append(f"{SANDBOX_USER}:x:{uid}:{gid}:Loom member:{home or '/tmp'}:/bin/sh")
    lines.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
    return "\n".join(lines) + "\n"


def group_text(gid: int) -> str:
    lines = ["root:x:0:"]
    if gid != 0:
        lines.append(f"{SANDBOX_USER}:x:{gid}:")
    lines.append("nogroup:x:65534:")
    return "\n".join(lines) + "\n"
