"""Benchmark: agent heartbeats over real WebSockets against one coordinator process.

Run: .venv/bin/python bench/heartbeats.py [--agents 1000 10000] [--rate 5000] [--duration 20]
     [--warmup 5] [--db sqlite|postgresql://postgres@127.0.0.1:5432/test] [--profile DIR]
     [--record]

For each N in --agents: start a fresh coordinator (`python -m loom coordinator serve`, its own
temporary LOOM_HOME; SQLite in that directory, or a fresh PostgreSQL schema made and dropped
here with asyncpg), then in this process open N agent WebSockets with bounded concurrency,
each with its own Ed25519 node key, doing the full signed handshake (hello → auth with nonce
signature, owner binding and a tiny inventory → welcome). Connected agents beat at the
coordinator's interval (5 s) while the rest join, as real agents would; once all are in, the
aggregate rate steps up to --rate (each agent beats every N/rate seconds, spread round-robin),
and after --warmup seconds acks are measured for --duration seconds.

Reported per N: handshake time for all N (and per-handshake p50/p99), achieved heartbeats/s
(acks received in the window / window), round-trip p50/p99 from send to HeartbeatAck(seq),
CPU used by the coordinator and by this client, and whether the database keeps up: once a
second the DB is read for sum(nodes.heartbeats) and compared with what was acked (the
backlog), and at the end, after two flush intervals, every acked beat must be in the DB and
every node online (not offline or banned) with a recent last_heartbeat_at.

Client settings mirror `loom worker start` (ping_interval=20, default permessage-deflate).
Both processes are on the same machine, so on 2 cores the client's own CPU competes with the
coordinator's and its event-loop lag is part of the measured round trip (reported apart).
``--profile DIR`` attaches py-spy to the coordinator for the measurement window (py-spy must be
installed in the venv; it is not a project dependency) and prints the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from loom.protocol.identity import KeyPair, agent_auth_message, binding_message
from loom.protocol.messages import MAX_FRAME_BYTES, Auth, Inventory
from loom.protocol.version import PROTOCOL_VERSION

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = Path(__file__).resolve().parent.parent
FLUSH_S = 1.0  # Settings.heartbeat_flush_s
INVENTORY = Inventory(cpu_model="bench cpu", cpu_cores=2, ram_mb=4096, disk_free_mb=10_000)
BEAT = '{{"type":"heartbeat","seq":{seq},"load":{{"cpu_percent":12.5,"mem_used_mb":2048,"gpu_util_percent":[]}}}}'  # noqa: E501


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / hz, sum(fields) / hz


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the database the coordinator writes ------------------------------------------------


class Db:
    """Read-only view of the coordinator's `nodes` table, SQLite or PostgreSQL."""

    def __init__(self, spec: str, tmp: Path) -> None:
        self.spec = spec
        self.sqlite_path = tmp / "coordinator.db"
        self.schema = f"bench_hb_{secrets.token_hex(4)}"
        self._pg: Any = None

    @property
    def is_pg(self) -> bool:
        return self.spec.startswith("postgres")

    def _pg_dsn(self) -> str:
        parts = urlsplit(self.spec)
        query = {k: v for k, v in parse_qsl(parts.query) if k != "schema"}
        return urlunsplit(parts._replace(query=urlencode(query)))

    def coordinator_url(self) -> str:
        if not self.is_pg:
            return f"sqlite:///{self.sqlite_path}"
        return self._pg_dsn() + ("&" if "?" in self._pg_dsn() else "?") + f"schema={self.schema}"

    async def create(self) -> None:
        if self.is_pg:
            import asyncpg  # type: ignore[import-untyped]

            self._pg = await asyncpg.connect(self._pg_dsn())
            await self._pg.execute(f'CREATE SCHEMA "{self.schema}"')
            await self._pg.execute(f'SET search_path TO "{self.schema}"')

    async def drop(self) -> None:
        if self._pg is not None:
            await self._pg.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            await self._pg.close()

    async def snapshot(self) -> dict[str, float]:
        sql = (
            "SELECT count(*), coalesce(sum(heartbeats), 0), min(last_heartbeat_at), "
            "max(last_heartbeat_at), "
            "sum(CASE WHEN state IN ('offline', 'banned') THEN 0 ELSE 1 END) FROM nodes"
        )
        if self._pg is not None:
            row = tuple(await self._pg.fetchrow(sql))
        else:

            def read() -> tuple[Any, ...]:
                uri = f"file:{self.sqlite_path}?mode=ro"
                with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as con:
                    return tuple(con.execute(sql).fetchone())

            row = await asyncio.to_thread(read)
        n, total, oldest, newest, available = row
        return {
            "nodes": float(n or 0),
            "heartbeats": float(total or 0),
            "oldest": float(oldest or 0),
            "newest": float(newest or 0),
            "available": float(available or 0),
        }


# -- the simulated agents ---------------------------------------------------------------


@dataclass(eq=False)
class Agent:
    node: KeyPair
    owner: KeyPair
    binding_sig: str
    ws: ClientConnection | None = None
    seq: int = 0
    sent: dict[int, float] = field(default_factory=dict)


@dataclass
class Stats:
    window: tuple[float, float] = (float("inf"), float("inf"))
    acks_total: int = 0
    acks_in_window: int = 0
    sent_in_window: int = 0
    rtts_ms: list[float] = field(default_factory=list)
    handshake_ms: list[float] = field(default_factory=list)
    closed: collections.Counter[str] = field(default_factory=collections.Counter)
    tick_lag_ms: list[float] = field(default_factory=list)
    early_commands: int = 0


def ack(command: dict[str, Any]) -> str:
    """member.sync succeeds (nothing runs here); anything else, e.g. a hardware challenge,
    is refused as an agent without a prover would."""
    if command.get("name") == "member.sync":
        return json.dumps({"type": "ack", "id": command["id"], "ok": True, "result": {}})
    error = f"bench agent: {command.get('name')} not supported"
    return json.dumps({"type": "ack", "id": command["id"], "ok": False, "error": error})


async def handshake(agent: Agent, url: str, stats: Stats) -> None:
    t0 = time.perf_counter()
    ws = await connect(url, max_size=MAX_FRAME_BYTES, open_timeout=60, ping_interval=20)
    hello = json.loads(await ws.recv())
    auth = Auth(
        protocol=PROTOCOL_VERSION,
        agent_version="bench",
        node_key=agent.node.public_hex,
        owner_key=agent.owner.public_hex,
        binding_sig=agent.binding_sig,
        nonce_sig=agent.node.sign(agent_auth_message(hello["nonce"])).hex(),
        name=f"bench-{agent.node.public_hex[:8]}",
        region="eu-west",
        country="DE",
        price="0.30",
        inventory=INVENTORY,
    )
    await ws.send(auth.model_dump_json())
    while True:
        msg = json.loads(await ws.recv())
        if msg.get("type") == "welcome":
            break
        if msg.get("type") != "command":
            raise RuntimeError(f"expected welcome, got {msg.get('type')!r}")
        # The coordinator may send a command (member.sync) before its welcome: answer it.
        stats.early_commands += 1
        await ws.send(ack(msg))
    stats.handshake_ms.append((time.perf_counter() - t0) * 1000)
    agent.ws = ws


async def receive(agent: Agent, stats: Stats) -> None:
    assert agent.ws is not None
    clock = time.perf_counter
    try:
        async for raw in agent.ws:
            now = clock()
            msg = json.loads(raw)
            if msg.get("type") != "heartbeat_ack":
                if msg.get("type") == "command":  # member.sync on connect: say done
                    await agent.ws.send(ack(msg))
                continue
            sent = agent.sent.pop(msg["seq"], None)
            stats.acks_total += 1
            start, end = stats.window
            if start <= now < end:
                stats.acks_in_window += 1
            if sent is not None and start <= sent < end:
                stats.rtts_ms.append((now - sent) * 1000)
    except ConnectionClosed as exc:
        stats.closed[f"{exc.rcvd.code if exc.rcvd else 1006}"] += 1
    else:
        stats.closed[f"{agent.ws.close_code}"] += 1


class Beater:
    """Sends heartbeats round-robin over the connected agents at `rate` beats/s in total."""

    TICK_S = 0.002

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.agents: list[Agent] = []
        self.per_agent_interval_s = 5.0
        self.running = True
        self._next = 0

    async def run(self) -> None:
        clock = time.perf_counter
        stats = self.stats
        last = clock()
        credit = 0.0
        while self.running:
            await asyncio.sleep(self.TICK_S)
            now = clock()
            stats.tick_lag_ms.append((now - last - self.TICK_S) * 1000)
            if len(stats.tick_lag_ms) > 200_000:
                del stats.tick_lag_ms[:100_000]
            rate = len(self.agents) / self.per_agent_interval_s
            credit += rate * (now - last)
            last = now
            due = int(credit)
            credit -= due
            start, end = stats.window
            for _ in range(min(due, len(self.agents))):
                agent = self.agents[self._next % len(self.agents)]
                self._next += 1
                if agent.ws is None:
                    continue
                agent.seq += 1
                t = clock()
                agent.sent[agent.seq] = t
                if start <= t < end:
                    stats.sent_in_window += 1
                try:
                    await agent.ws.send(BEAT.format(seq=agent.seq))
                except ConnectionClosed:
                    agent.ws = None


# -- one run ----------------------------------------------------------------------------


@dataclass
class Result:
    agents: int
    rate: int
    db: str
    handshake_s: float = 0.0
    handshake_p50_ms: float = 0.0
    handshake_p99_ms: float = 0.0
    achieved: float = 0.0
    sent_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    client_lag_p99_ms: float = 0.0
    coord_cpu: float = 0.0
    client_cpu: float = 0.0
    backlog_max: float = 0.0
    others_cpu: float = 0.0
    us_per_beat: float = 0.0
    db_ok: bool = False
    db_note: str = ""
    closed: str = ""
    profile_top: list[str] = field(default_factory=list)


async def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base}/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError("coordinator did not become healthy in 60 s")


def summarize_profile(path: Path, top: int = 15) -> list[str]:
    """Self and inclusive sample share per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        if "_connection_worker_thread" in stack or "worker_thread" in stack:
            continue  # aiosqlite's and anyio's threads: mostly waiting on a queue
        total += n
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0] for f in stack.split(";")
        ]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return []
    lines = [f"{total} samples; self%  incl%  function"]
    for f, n in own.most_common(top):
        lines.append(f"{100 * n / total:5.1f} {100 * incl[f] / total:6.1f}  {f}")
    return lines


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:]


def start_coordinator(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def spy_on(pid: int, duration_s: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """py-spy (main thread only) into collapsed stacks; it pauses the target to sample."""
    spy_bin = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy_bin), "record", "--pid", str(pid), "--duration", str(duration_s)]
    cmd += ["--rate", "100", "--format", "raw", "-o", str(out)]
    with log.open("wb") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


async def run_one(n: int, args: argparse.Namespace) -> Result:
    result = Result(agents=n, rate=args.rate, db="postgresql" if args.db != "sqlite" else "sqlite")
    tmp = Path(tempfile.mkdtemp(prefix="loom-bench-hb-"))
    db = Db(args.db, tmp)
    await db.create()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LOOM_HOME": str(tmp / "home")}
    log = tmp / "coordinator.log"
    cmd = [sys.executable, "-m", "loom", "coordinator", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--db", db.coordinator_url(), "--log-level", "warning"]
    proc = start_coordinator(cmd, env, log)
    stats = Stats()
    beater = Beater(stats)
    agents: list[Agent] = []
    receivers: list[asyncio.Task[None]] = []
    try:
        await wait_healthy(base, proc, log)
        owners = [KeyPair.generate() for _ in range(max(1, n // 100))]
        for i in range(n):
            node, owner = KeyPair.generate(), owners[i % len(owners)]
            binding = owner.sign(binding_message(node.public_hex)).hex()
            agents.append(Agent(node=node, owner=owner, binding_sig=binding))
        url = base.replace("http://", "ws://") + "/v1/agent/ws"
        beater_task = asyncio.create_task(beater.run())
        sem = asyncio.Semaphore(args.concurrency)
        failures: collections.Counter[str] = collections.Counter()

        async def join(agent: Agent) -> None:
            async with sem:
                try:
                    await handshake(agent, url, stats)
                except Exception as exc:
                    failures[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
                    return
            receivers.append(asyncio.create_task(receive(agent, stats)))
            beater.agents.append(agent)

        reg_spy = None
        if args.profile:
            reg_prof = Path(args.profile) / f"handshakes-{n}-{result.db}.txt"
            reg_prof.parent.mkdir(parents=True, exist_ok=True)
            reg_spy = spy_on(proc.pid, 3600, reg_prof, tmp / "py-spy-reg.log")
        t0 = time.perf_counter()
        await asyncio.gather(*(join(a) for a in agents))
        if reg_spy is not None:
            reg_spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            reg_spy.wait(timeout=60)
            result.profile_top += ["registration:", *summarize_profile(reg_prof)]
        result.handshake_s = time.perf_counter() - t0
        result.handshake_p50_ms = pct(stats.handshake_ms, 0.5)
        result.handshake_p99_ms = pct(stats.handshake_ms, 0.99)
        if failures:
            print(f"  handshake failures: {dict(failures)}", file=sys.stderr)
        print(
            f"  N={n}: {len(beater.agents)} agents in {result.handshake_s:.1f} s; "
            f"warming up at {args.rate}/s",
            file=sys.stderr,
        )

        beater.per_agent_interval_s = n / args.rate
        await asyncio.sleep(args.warmup)
        start = time.perf_counter()
        stats.window = (start, start + args.duration)
        stats.tick_lag_ms.clear()
        coord_cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
        busy0, _ = system_busy()
        spy: subprocess.Popen[bytes] | None = None
        if args.profile:
            prof = Path(args.profile) / f"heartbeats-{n}-{result.db}.txt"
            prof.parent.mkdir(parents=True, exist_ok=True)
            spy = spy_on(proc.pid, int(args.duration), prof, tmp / "py-spy.log")
        backlog: list[float] = []
        registered = len(beater.agents)
        while time.perf_counter() < start + args.duration:
            await asyncio.sleep(1.0)
            snap = await db.snapshot()
            backlog.append(registered + stats.acks_total - snap["heartbeats"])
            if args.verbose:
                print(
                    f"    t={time.perf_counter() - start:5.1f}s acks={stats.acks_total} "
                    f"db={int(snap['heartbeats'])} backlog={int(backlog[-1])} "
                    f"newest flushed beat {time.time() - snap['newest']:.1f} s ago",
                    file=sys.stderr,
                )
        result.coord_cpu = (cpu_seconds(proc.pid) - coord_cpu0) / args.duration
        result.client_cpu = (time.process_time() - client0) / args.duration
        busy1, _ = system_busy()
        result.others_cpu = (busy1 - busy0) / args.duration - result.coord_cpu - result.client_cpu
        result.achieved = stats.acks_in_window / args.duration
        result.us_per_beat = 1e6 * result.coord_cpu / max(result.achieved, 1.0)
        result.sent_rate = stats.sent_in_window / args.duration
        result.p50_ms = pct(stats.rtts_ms, 0.5)
        result.p99_ms = pct(stats.rtts_ms, 0.99)
        result.max_ms = max(stats.rtts_ms, default=float("nan"))
        result.client_lag_p99_ms = pct(stats.tick_lag_ms, 0.99)
        result.backlog_max = max(backlog, default=0.0)

        # Stop beating, let the last acks arrive and two flushes run, then check the DB.
        beater.running = False
        await beater_task
        await asyncio.sleep(0.5 + 2 * FLUSH_S)
        snap = await db.snapshot()
        expected = registered + stats.acks_total
        now = time.time()
        stale_s = now - snap["oldest"] if snap["oldest"] else float("inf")
        result.db_ok = (
            snap["heartbeats"] >= expected
            and snap["available"] == registered
            and stale_s < beater.per_agent_interval_s + 2 * FLUSH_S + 3.0
        )
        result.db_note = (
            f"db sum {int(snap['heartbeats'])} vs acked {expected}; "
            f"{int(snap['available'])}/{registered} online; oldest beat {stale_s:.1f} s ago"
        )
        result.closed = ", ".join(f"{k}:{v}" for k, v in stats.closed.items())
        if spy is not None:
            try:
                spy.wait(timeout=30)
                result.profile_top += ["heartbeat window:", *summarize_profile(prof)]
            except (subprocess.TimeoutExpired, OSError) as exc:
                spy_log = (tmp / "py-spy.log").read_text()[-500:]
                result.profile_top = [f"py-spy failed: {exc}: {spy_log}"]
    finally:
        beater.running = False
        sem_close = asyncio.Semaphore(500)

        async def close(agent: Agent) -> None:
            if agent.ws is not None:
                async with sem_close:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(agent.ws.close(), 5)

        await asyncio.gather(*(close(a) for a in agents))
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await db.drop()
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if "ERROR" in ln]
        if errors:
            print(f"  coordinator logged {len(errors)} errors, e.g.:", file=sys.stderr)
            for line in collections.Counter(ln[24:200] for ln in errors).most_common(5):
                print(f"    {line[1]} × {line[0]}", file=sys.stderr)
        if args.keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


# -- report -----------------------------------------------------------------------------

HEADER = (
    "| agents | target/s | achieved acks/s | p50 ms | p99 ms | max ms | handshakes: all N "
    "(p50/p99 ms each) | coordinator CPU (µs/beat) | client CPU | other procs CPU | "
    "client lag p99 ms | DB backlog max | DB keeps up |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"
)


def row(r: Result) -> str:
    return (
        f"| {r.agents:,} | {r.rate:,} | {r.achieved:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
        f"{r.max_ms:.0f} | {r.handshake_s:.1f} s ({r.handshake_p50_ms:.0f}/"
        f"{r.handshake_p99_ms:.0f}) | {100 * r.coord_cpu:.0f} % ({r.us_per_beat:.0f}) | "
        f"{100 * r.client_cpu:.0f} % | {100 * r.others_cpu:.0f} % | {r.client_lag_p99_ms:.1f} | "
        f"{r.backlog_max:,.0f} | {'yes' if r.db_ok else 'NO'} |"
    )


def record(results: list[Result], args: argparse.Namespace, argv: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    today = datetime.date(2026, 11, 25).isoformat()
    lines = [
        "",
        f"## heartbeats ({results[0].db})" if args.db != "sqlite" else "## heartbeats",
        "",
        f"{today} · 2-core x86_64 VM (python-svc), Python 3.11 · "
        f"`.venv/bin/python bench/heartbeats.py {argv}`",
        "",
        HEADER,
        *(row(r) for r in results),
        "",
    ]
    RESULTS.write_text(text.rstrip("\n") + "\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rate", type=int, default=5000, help="aggregate heartbeats/s")
    parser.add_argument("--duration", type=float, default=20.0, help="measurement window, s")
    parser.add_argument("--warmup", type=float, default=5.0, help="s at full rate before it")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument(
        "--db", default="sqlite", help="sqlite, or postgresql://USER@HOST:PORT/DB (fresh schema)"
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the coordinator's window")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, DB)")
    parser.add_argument("--verbose", action="store_true", help="print DB samples each second")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    hard = raise_nofile()
    if max(args.agents) + 200 > hard:
        parser.error(f"RLIMIT_NOFILE hard limit {hard} is too low for {max(args.agents)} agents")
    results = []
    for n in args.agents:
        r = asyncio.run(run_one(n, args))
        results.append(r)
        print(row(r))
        print(f"  {r.db_note}; sent {r.sent_rate:,.0f}/s; closes {r.closed or 'none'}")
        for line in r.profile_top:
            print("   ", line)
    print()
    print(HEADER)
    for r in results:
        print(row(r))
    if args.record:
        record(results, args, " ".join(sys.argv[1:]).replace(" --record", ""))


if __name__ == "__main__":
    main()
