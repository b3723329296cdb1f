"""Ray node lifecycle: specs and ports (fast), and real Ray clusters in sandboxes (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.agent.raynode import (
    LOOPBACK_NODE_IP,
    PortAllocator,
    PortBlock,
    PortsExhausted,
    RayNode,
    RayNodeError,
    RayNodeSpec,
    cleanup_stale_members,
    ray_address,
    ray_host,
)
from loom.agent.raynode_ports import port_is_free
from loom.agent.raynode_spec import MemberPaths, build_env, build_ray_start_argv
from loom.agent.runtimes import BwrapRuntime, ProcessRuntime, find_marked, probe_bwrap
from loom.agent.runtimes.base import iter_pids

TOKEN = "a" * 64
OBJECT_STORE = 80 * 1024 * 1024


def _spec(base: Path, role: str = "head", **kw: object) -> RayNodeSpec:
    return RayNodeSpec(
        cluster_id="c1",
        member_id=f"m-{role}",
        role=role,  # type: ignore[arg-type]
        token=kw.pop("token", TOKEN),  # type: ignore[arg-type]
        base_dir=base,
        num_cpus=1,
        object_store_bytes=OBJECT_STORE,
        **kw,  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------- fast


def test_loopback_addresses_avoid_rays_rewrite() -> None:
    assert ray_host("127.0.0.1") == LOOPBACK_NODE_IP == "127.0.0.2"
    assert ray_host("localhost") == "127.0.0.2"
    assert ray_host("10.1.2.3") == "10.1.2.3"
    assert ray_address("127.0.0.1:6379") == "127.0.0.2:6379"
    with pytest.raises(ValueError, match="host:port"):
        ray_address("nohost")


def test_spec_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_address"):
        _spec(tmp_path, "worker")
    with pytest.raises(ValueError, match="token"):
        _spec(tmp_path, token="short")
    with pytest.raises(ValueError, match="member_id"):
        RayNodeSpec("c1", "../x", "head", TOKEN, tmp_path)
    with pytest.raises(ValueError, match="RAY_AUTH_MODE"):
        _spec(tmp_path, env={"RAY_AUTH_MODE": "disabled"})
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        _spec(tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    with pytest.raises(ValueError, match="too long"):
        MemberPaths.for_spec(_spec(tmp_path, ray_tmp_root=Path("/tmp/" + "x" * 40)))


def test_ray_start_argv_and_env(tmp_path: Path) -> None:
    ports = PortBlock.at(30000)
    head = _spec(tmp_path, gpu_indices=(1, 3), gpu_uuids=("GPU-a", "GPU-b"), env={"FOO": "1"})
    paths = MemberPaths.for_spec(head)
    argv = build_ray_start_argv(head, ports, paths.ray_temp, "/venv/bin/ray")
    assert argv[:3] == ["/venv/bin/ray", "start", "--block"]
    assert "--head" in argv and "--port=30001" in argv and "--num-gpus=2" in argv
    assert "--node-ip-address=127.0.0.2" in argv
    assert f"--min-worker-port={ports.min_worker}" in argv
    assert not any(TOKEN in a for a in argv)  # the token only travels in the environment
    env = build_env(head, paths, "/venv/bin/ray")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == TOKEN
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b" and env["FOO"] == "1"
    assert env["PATH"].startswith("/venv/bin:")
    worker = _spec(tmp_path, "worker", head_address="127.0.0.1:30001")
    wargv = build_ray_start_argv(worker, PortBlock.at(30128), paths.ray_temp)
    assert "--address=127.0.0.2:30001" in wargv and "--head" not in wargv
    assert build_env(worker, MemberPaths.for_spec(worker), "ray")["CUDA_VISIBLE_DEVICES"] == ""
    assert len(str(paths.ray_temp)) < 40 and str(paths.root).startswith(str(tmp_path))


def test_port_blocks_are_disjoint_and_skip_busy_ports() -> None:
    first, size = 24000, 64
    busy = socket.socket()
    busy.bind(("127.0.0.1", first + size + 5))  # a port inside the second block
    busy.listen()
    a = PortAllocator(first, first + 4 * size - 1, size)
    other_agent = PortAllocator(first, first + 4 * size - 1, size)
    try:
        l1 = a.allocate()
        l2 = other_agent.allocate()  # another agent on this machine: the sentinel is taken
        l3 = a.allocate()
        starts = {l1.start, l2.start, l3.start}
        assert len(starts) == 3 and first + size not in starts
        ports = [set(lease.block.ports()) for lease in (l1, l2, l3)]
        assert not (ports[0] & ports[1] or ports[0] & ports[2] or ports[1] & ports[2])
        assert len(l1.block.ports()) == len(set(l1.block.ports()))
        with pytest.raises(PortsExhausted):
            a.allocate()
        l1.release()
        l1.release()  # idempotent
        assert a.allocate().start == l1.start
    finally:
        busy.close()
        for lease in (l1, l2, l3):
            lease.release()


# ----------------------------------------------------------------------------- slow: real Ray

needs_bwrap = pytest.mark.skipif(
    probe_bwrap() is not None, reason=f"bubblewrap unusable: {probe_bwrap()}"
)

DRIVER = """
import json, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address="{address}", logging_level="error", log_to_driver=False)
print("CONNECTED", flush=True)
@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
        for n in nodes]
print(json.dumps({{"nodes": nodes, "ran_on": ray.get(refs, timeout=120)}}), flush=True)
"""

REFUSED_MARKERS = ("InvalidAuthToken", "Unauthenticated")


def _driver_env(token: str | None, home: Path) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if token is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = token
    return env


async def _refused(address: str, token: str | None, home: Path) -> str:
    """Run a driver; return the server's refusal as soon as it shows (kill the driver then)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"import ray; ray.init(address={address!r}); print('CONNECTED')",
        env=_driver_env(token, home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = ""
    try:
        async with asyncio.timeout(60):
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                seen += line
                assert "CONNECTED" not in line, f"driver without the token connected:\n{seen}"
                if any(m in line for m in REFUSED_MARKERS):
                    return line.strip()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    raise AssertionError(f"driver was not refused by the server:\n{seen}")


def _leftovers(nodes: list[RayNode]) -> list[str]:
    """Processes or files of these members that still exist."""
    problems: list[str] = []
    for node in nodes:
        for pid in find_marked(node.marker, [node.paths.ray_temp]):
            problems.append(f"process {pid} of {node.spec.member_id}")
        for path in node.paths.all_dirs():
            if path.exists():
                problems.append(f"path {path}")
    needles = [str(n.paths.ray_temp).encode() for n in nodes]
    for pid in iter_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            problems.append(f"process {pid} names a member dir: {cmdline[:120]!r}")
    return problems


@pytest.mark.slow
@needs_bwrap
async def test_two_node_cluster_in_bwrap_with_token(tmp_path: Path) -> None:
    token = secrets.token_hex(32)
    ports = PortAllocator()
    runtime = BwrapRuntime()
    base = tmp_path / "agent"
    base.mkdir()
    head = RayNode(_spec(base, token=token, include_dashboard=False), runtime, ports)
    nodes = [head]
    try:
        await head.start()
        info = await head.wait_ready(120)
        assert info.gcs_address == f"127.0.0.2:{info.ports.gcs}"
        worker = RayNode(
            _spec(base, "worker", token=token, head_address=info.gcs_address), runtime, ports
        )
        nodes.append(worker)
        await worker.start()
        winfo = await worker.wait_ready(120)
        assert winfo.node_id != info.node_id
        assert set(head.ports.ports()).isdisjoint(worker.ports.ports())
        hh, wh = await asyncio.gather(head.health(), worker.health())
        assert hh.healthy and wh.healthy, (hh, wh)
        assert (hh.node_id, wh.node_id) == (info.node_id, winfo.node_id)

        # The sandboxes really are sandboxes: each member's processes are in its own PID ns.
        for node in nodes:
            pids = find_marked(node.marker)
            assert len(pids) > 3
            assert len({os.readlink(f"/proc/{p}/ns/pid") for p in pids}) == 2  # host + sandbox

        home = tmp_path / "driver-home"
        home.mkdir()
        good = asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            DRIVER.format(address=info.gcs_address),
            env=_driver_env(token, home),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        proc = await good
        # A node with the wrong token cannot join: the head refuses it.
        intruder = RayNode(
            RayNodeSpec(
                "c1", "m-intruder", "worker", "b" * 64, base,
                head_address=info.gcs_address, object_store_bytes=OBJECT_STORE,
            ),
            runtime,
            ports,
        )  # fmt: skip
        nodes.append(intruder)
        await intruder.start()
        intruder_refused = asyncio.ensure_future(intruder.wait_ready(90))
        refusals = await asyncio.gather(
            _refused(info.gcs_address, None, home),  # a plain driver: no token at all
            _refused(info.gcs_address, "b" * 64, home),  # the wrong token
        )
        assert all("InvalidAuthToken" in r or "Unauthenticated" in r for r in refusals)
        with pytest.raises(RayNodeError, match="refused the cluster token"):
            await intruder_refused
        # The head refused its raylet too. The probe (above) learns of the refusal first; the
        # raylet's own refusal reaches its log when `ray start` gives up, later on a busy host.
        for _ in range(120):  # up to 60 s
            if "InvalidAuthToken" in intruder.log_tail():
                break
            await asyncio.sleep(0.5)
        assert "InvalidAuthToken" in intruder.log_tail(), intruder.log_tail()
        await intruder.stop()
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert set(result["nodes"]) == {info.node_id, winfo.node_id}
        assert sorted(result["ran_on"]) == sorted(result["nodes"])  # one task on each node

        await worker.stop()
        await worker.stop()  # idempotent
        assert _leftovers([worker]) == []
        # The head notices the worker is gone and is still healthy.
        assert (await head.health()).healthy
    finally:
        for node in reversed(nodes):
            await node.stop()
    assert _leftovers(nodes) == []
    assert list((base / "members").iterdir()) == []
    # the ports are free again
    assert all(port_is_free(p) for p in (info.ports.gcs, winfo.ports.node_manager))


@pytest.mark.slow
async def test_process_runtime_head_lifecycle(tmp_path: Path) -> None:
    node = RayNode(_spec(tmp_path, include_dashboard=False), ProcessRuntime(), PortAllocator())
    try:
        await node.start()
        await node.start()  # idempotent
        info = await node.wait_ready(120)
        assert info.client_address == f"ray://127.0.0.2:{info.ports.client_server}"
        assert (await node.wait_ready(1)) is info
        assert (await node.health()).healthy
        pids = find_marked(node.marker, [node.paths.ray_temp])
        assert len(pids) > 3
        assert node.pid in pids
    finally:
        started = time.monotonic()
        await node.stop()
        stop_s = time.monotonic() - started
    assert _leftovers([node]) == []
    assert stop_s < 30
    health = await node.health()
    assert not health.process_alive and not health.healthy
    await node.stop()


async def test_busy_ports_refused_at_start(tmp_path: Path) -> None:
    lease = PortAllocator(26000, 27999).allocate()
    block = lease.block
    lease.release()
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", block.gcs))
    squatter.listen()
    try:
        node = RayNode(_spec(tmp_path, ports=block), ProcessRuntime())
        with pytest.raises(RayNodeError, match="in use"):
            await node.start()
        assert node.state == "failed" and node.pid is None
        await node.stop()
        assert _leftovers([node]) == []
    finally:
        squatter.close()


async def test_node_dying_before_ready_is_reported_and_cleaned(tmp_path: Path) -> None:
    """`ray start` exits early: wait_ready says so at once, with the log; nothing remains."""
    node = RayNode(_spec(tmp_path), ProcessRuntime(), PortAllocator(), ray_executable="/bin/false")
    await node.start()
    started = time.monotonic()
    with pytest.raises(RayNodeError, match="exited with code 1 before it was ready"):
        await node.wait_ready(60)
    assert time.monotonic() - started < 10
    assert node.state == "failed"
    await node.stop()
    assert _leftovers([node]) == []


@pytest.mark.slow
def test_cleanup_stale_members_after_agent_crash(tmp_path: Path) -> None:
    """Members left by a killed agent are found by marker and removed at restart."""
    base = tmp_path / "agent"
    base.mkdir()
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from loom.agent.raynode import RayNode, RayNodeSpec, PortAllocator\n"
        "from loom.agent.runtimes import ProcessRuntime\n"
        "async def main():\n"
        "    spec = RayNodeSpec('c9', 'm9', 'head', 'z' * 32, Path(sys.argv[1]),\n"
        "                       object_store_bytes=80 << 20, include_dashboard=False)\n"
        "    node = RayNode(spec, ProcessRuntime(), PortAllocator())\n"
        "    await node.start()\n"
        "    print(node.marker, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    agent = subprocess.Popen([sys.executable, "-c", code, str(base)], stdout=subprocess.PIPE)
    assert agent.stdout is not None
    marker = agent.stdout.readline().decode().strip()
    deadline = time.monotonic() + 30
    while len(find_marked(marker)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert find_marked(marker)
    # Simulate a crash that PDEATHSIG does not cover (the agent is frozen, not dead).
    agent.send_signal(19)  # SIGSTOP
    try:
        stale = asyncio.run(cleanup_stale_members(base))
        assert stale == [marker]
        assert find_marked(marker) == []
        assert list((base / "members").iterdir()) == []
        assert not any(p.name.startswith(f"loom-{marker[-10:]}") for p in Path("/tmp").iterdir())
    finally:
        agent.kill()
        agent.wait()
