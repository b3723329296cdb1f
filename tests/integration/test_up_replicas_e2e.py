"""`loom up --replicas` as a user runs it (issue 11 §7): the README's command, then the CLI.

The command is taken from the README's replicas block (the database swapped for a fresh
one this test creates and drops; two agents, the ``process`` runtime, a free port). Once it
prints its replicas, every replica answers signed ``/v1`` requests and lists the same
nodes; a cluster is created through the *last* replica, which holds no agent (agent ``i``
dials replica ``i mod N`` first), so every member command crosses NATS, and a job runs
through that replica's tunnel with ``loom job submit --follow``. As root with Nebula (CI),
the members join the one overlay every replica serves (a lighthouse each, one CA, the
book in PostgreSQL): both replicas show the same overlay addresses. Then, the cluster still
up, ``loom up`` gets SIGTERM (what Ctrl-C does) and must exit with nothing left behind: no
process that was part of the network before the signal (its tree: replicas, agents, the
members' Ray nodes) may outlive it.

Needs PostgreSQL on 127.0.0.1:5432 and NATS on 127.0.0.1:4222; skipped with the reason
otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from loom.launcher import free_port
from support.background import Background
from support.db import DEFAULT_PG, backend, is_postgres
from support.nats import needs_nats

README = Path(__file__).resolve().parents[2] / "README.md"
PG = backend() if is_postgres() else DEFAULT_PG
#: The server part of PG (no database, no query): where the fresh database is created.
PG_SERVER = re.sub(r"/[^/?]*(\?.*)?$", "", PG)

pytestmark = [pytest.mark.slow, needs_nats]
#: `loom up` runs the overlay where members can join it (root, Nebula installed; CI).
OVERLAY = os.geteuid() == 0 and all(shutil.which(b) for b in ("nebula", "bwrap", "nft"))


def readme_up_line() -> str:
    """The `loom up --replicas` line of the README's replicas block, without its comment."""
    text = README.read_text()
    start = text.index("A network larger than one coordinator process")
    block = re.search(r"^```\w*\n(.*?)^```$", text[start:], re.S | re.M)
    assert block is not None, "the README's replicas paragraph has a code block"
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("loom up --replicas")]
    assert lines, "the README's replicas block shows `loom up --replicas`"
    return re.sub(r"\s+#.*$", "", lines[0]).strip()


def test_the_readme_line_is_what_this_test_runs() -> None:
    line = readme_up_line()
    assert re.fullmatch(r"loom up --replicas \d --db postgresql://\S+", line), line


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def fresh_db() -> Iterator[str]:
    name = f"loom_up_{secrets.token_hex(4)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except OSError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _identity(pid: int) -> tuple[int, str] | None:
    """(start time, command line) of a live process, None if gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19]), cmd.strip()


def _tree(root: int) -> dict[int, tuple[int, str]]:
    """Every live descendant of `root` with its identity (pid reuse cannot fool us)."""
    tree = _children()
    found: dict[int, tuple[int, str]] = {}
    todo = list(tree.get(root, []))
    while todo:
        pid = todo.pop()
        ident = _identity(pid)
        if ident is not None:
            found[pid] = ident
        todo.extend(tree.get(pid, []))
    return found


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "loom", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    where = f"`loom {' '.join(args)}`"
    assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stdout + done.stderr, f"{where}:\n{done.stderr}"
    return done.stdout


@pytest.mark.timeout(900)
def test_loom_up_replicas_serves_a_cluster_and_stops_clean(fresh_db: str, tmp_path: Path) -> None:
    line = readme_up_line()
    line = re.sub(r"postgresql://\S+", fresh_db, line)
    # The sandbox runtime gives each member its own network, the overlay's (as root).
    runtime = "bwrap" if OVERLAY else "process"
    line += f" --agents 2 --runtime {runtime} --port {free_port()}"
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_HOME=str(home),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    up = subprocess.Popen(
        ["bash", "-c", f"exec {line}"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = Background(up)
    out.start_reader()
    network: dict[int, tuple[int, str]] = {}
    try:
        started = time.monotonic()
        out.wait_for(r"export LOOM_COORDINATOR=(\S+)", 420)
        urls = out.wait_for(r"replicas: (\S.*?) \(bus", 5).group(1).split(", ")
        print(f"`{line}` ready in {time.monotonic() - started:.1f} s: {urls}")
        assert len(urls) == int(line.split()[3]) and len(set(urls)) == len(urls)
        user = dict(env, LOOM_COORDINATOR=urls[0])
        # Every replica serves the signed API and sees the same network.
        for url in urls:
            nodes = json.loads(_cli(user, "--coordinator", url, "nodes", "--json"))
            assert sorted(n["name"] for n in nodes) == ["local-1", "local-2"], (url, nodes)
            assert all(n["state"] == "available" for n in nodes), (url, nodes)
        _cli(user, "credits", "deposit", "50")
        # Through the replica that holds no agent: every member command crosses NATS.
        last = urls[-1]
        made = _cli(
            user, "--coordinator", last, "cluster", "up", "--name", "rep", "--nodes", "2",
            "--cpus", "1", "--region", "eu-west", "--duration", "30m", "--yes",
            "--timeout", "300", timeout=360,
        )  # fmt: skip
        assert "is running" in made, made
        job = _cli(
            user, "--coordinator", last, "job", "submit", "rep", "--follow", "--",
            "python", "-c", "import ray; ray.init(); print('ALIVE', len(ray.nodes()))",
        )  # fmt: skip
        assert "ALIVE 2" in job and "SUCCEEDED" in job, job
        # Another replica sees the cluster the last one made.
        status = _cli(user, "--coordinator", urls[0], "cluster", "status", "rep")
        assert "running" in status, status
        if OVERLAY:  # the one overlay of all replicas: each runs a lighthouse of it
            seen = [
                sorted(
                    m["overlay_ip"]
                    for m in json.loads(
                        _cli(user, "--coordinator", url, "cluster", "status", "rep", "--json")
                    )["members"]
                )
                for url in (urls[0], last)
            ]
            assert seen[0] == seen[1] and len(set(seen[0])) == 2, seen
            assert all(ip.startswith("10.250.") for ip in seen[0]), seen
        # Ctrl-C with the cluster still up: its Ray nodes are part of what must stop.
        network = _tree(up.pid)
        kinds = " ".join(cmd for _, cmd in network.values())
        assert kinds.count("coordinator serve") == len(urls) and kinds.count("worker start") == 2
        # The Ray node itself (not the sandbox's bwrap/setpriv wrappers around it).
        rays = [c for _, c in network.values() if re.match(r"\S*python\S* \S*/ray start ", c)]
        assert len(rays) == 2, kinds
        if OVERLAY:  # a lighthouse per replica, a Nebula per member
            nebulas = [c for _, c in network.values() if re.search(r"(^|/)nebula -config", c)]
            lighthouses = [c for c in nebulas if "lighthouse" in c]
            assert len(lighthouses) == len(urls) and len(nebulas) == len(urls) + 2, nebulas
    finally:
        if not network and up.poll() is None:
            network = _tree(up.pid)
        stopping = time.monotonic()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)  # `loom up` only, as Ctrl-C or kill would
        try:
            code = up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
            pytest.fail(f"`loom up` did not stop within 90 s of SIGTERM:\n{out.text()[-3000:]}")
        took = time.monotonic() - stopping
        time.sleep(2)  # the runtime's sweep of a member's last processes
        left = {p: ident for p, ident in network.items() if _identity(p) == ident}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    print(f"`loom up` stopped {len(network)} processes in {took:.1f} s after SIGTERM")
    assert not left, f"left behind after SIGTERM: {sorted(c for _, c in left.values())}"
    assert code == 0 and "stopped" in out.text(), (code, out.text()[-2000:])
