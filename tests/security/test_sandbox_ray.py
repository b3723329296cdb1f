"""Issue 14 §1 from inside a Ray task: a real Ray node in the bwrap sandbox, one for all.

The agent's data dir is a realistic LOOM_HOME under /root with keys and a coordinator
database; canaries sit in /srv, /home, /root, /mnt, /var; another member's work dir lies
next to this one's. A driver on the host submits one task, which tries every attack from
inside the node; the host side then checks the node's processes (uid, environment) and
that Ray's token-less metrics port is closed. Runs as root (CI), skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest

from loom.agent.raynode import PortAllocator, RayNode, RayNodeSpec
from loom.agent.raynode_ports import port_is_free
from loom.agent.runtimes import BwrapRuntime, find_marked, probe_bwrap
from loom.agent.runtimes.bwrap import BwrapHandle
from security.test_sandbox import PROBE, SECRET

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (per-member uids, cgroups)"),
    pytest.mark.skipif(probe_bwrap() is not None, reason=f"bubblewrap unusable: {probe_bwrap()}"),
]

DRIVER = r"""
import contextlib, io, json, sys
import ray
probe_src, attacks = sys.argv[1], sys.argv[2]
ray.init(address=sys.argv[3])

@ray.remote(num_cpus=0)
def probe(src, attacks):
    buf = io.StringIO()
    sys.argv = ["probe", attacks]
    with contextlib.redirect_stdout(buf):
        exec(compile(src, "probe", "exec"), {"__name__": "probe"})
    return buf.getvalue()

print(ray.get(probe.remote(probe_src, attacks), timeout=120).strip(), flush=True)
"""


def _plant(tag: str) -> tuple[Path, Path, Path, list[Path]]:
    """A LOOM_HOME under /root (keys, a coordinator DB), another member, canaries."""
    loom_home = Path("/root") / f".{tag}"
    base = loom_home / "agent"
    (loom_home / "keys").mkdir(parents=True)
    (loom_home / "keys" / "default.key").write_text(SECRET)
    (loom_home / "loom.db").write_text(f"SQLite format 3 {SECRET}")
    other = base / "members" / "0therm3mb3r" / "work"
    other.mkdir(parents=True)
    (other / "data.txt").write_text(SECRET)
    planted = [loom_home / "keys" / "default.key", loom_home / "loom.db", other / "data.txt"]
    for top in ("/srv", "/home", "/mnt", "/var"):
        if Path(top).is_dir():
            (Path(top) / tag).write_text(SECRET)
            planted.append(Path(top) / tag)
    return loom_home, base, other, planted


def _host_view(pids: list[int], handle: BwrapHandle) -> tuple[set[int | None], bytes]:
    """uids of the member's processes (but bwrap's), and the outer bwrap's environment."""
    bwraps = {handle.pid, *(p for p in pids if Path(f"/proc/{p}/comm").read_text() == "bwrap\n")}
    environ = Path(f"/proc/{handle.pid}/environ").read_bytes()
    return {_uid_of(p) for p in set(pids) - bwraps}, environ


def _uid_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def test_ray_task_cannot_leave_the_sandbox(tmp_path: Path) -> None:
    tag = f"loom-raycanary-{os.getpid()}"
    loom_home, base, other, planted = _plant(tag)
    token = secrets.token_hex(32)
    spec = RayNodeSpec(
        "c1",
        "m-head",
        "head",
        token,
        base,
        include_dashboard=False,
        object_store_bytes=80 << 20,
        env={"USER_VAR": "visible-inside"},
    )
    node = RayNode(spec, BwrapRuntime(), PortAllocator())
    try:
        await node.start()
        info = await node.wait_ready(120)
        handle = node._handle
        assert isinstance(handle, BwrapHandle)
        attacks = {
            "read": [*map(str, planted), "/etc/shadow"],
            "write": ["/etc/x", f"{sys.prefix}/x", str(other / "x"), str(base / "x")],
            "syscalls": {
                "unshare_user": (272, [0x10000000]),
                "ptrace_traceme": (101, [0, 0, 0, 0]),
                "mount": (165, [0, 0, 0, 0, 0]),
                "keyctl": (250, [0, 0, 0, 0, 0]),
            }
            if os.uname().machine == "x86_64"
            else {},
            "signal": [os.getpid()],
        }
        home = tmp_path / "driver"
        home.mkdir()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            DRIVER,
            PROBE,
            json.dumps(attacks),
            info.gcs_address,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        line = next(x for x in out.decode().splitlines() if x.startswith("PROBE "))
        got = json.loads(line[6:])

        # inside the task: nothing planted is readable, nothing outside writable
        for path, text in got["read"].items():
            assert SECRET not in text and text.startswith("refused"), (path, text)
        assert all(v.startswith("refused") for v in got["write"].values()), got["write"]
        assert all(v == "EPERM" for v in got["syscalls"].values()), got["syscalls"]
        assert got["uid"][0] not in (0, os.getuid()) and got["uid"][0] == handle.uid
        assert int(got["cap_eff"], 16) == 0 and got["no_new_privs"] == "1"
        assert got["env"]["USER_VAR"] == "visible-inside"
        assert got["env"]["RAY_AUTH_TOKEN"] == token  # its own cluster's, nothing more
        assert not {"home", "srv", "mnt", "opt", "run"} & set(got["root_dir"])

        # host side: every Ray process runs as the member's uid; bwrap has no user env
        pids = find_marked(node.marker)
        assert len(pids) > 3
        uids, environ = _host_view(pids, handle)
        assert uids == {handle.uid}
        assert b"USER_VAR" not in environ and token.encode() not in environ
        # Ray's Prometheus exporter (no token, all interfaces) is not running
        assert port_is_free(info.ports.metrics_export)
    finally:
        await node.stop()
        shutil.rmtree(loom_home, ignore_errors=True)
        for path in planted:
            path.unlink(missing_ok=True)
    assert find_marked(node.marker) == []
