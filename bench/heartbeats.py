"""Benchmark: agent heartbeats over real WebSockets against one coordinator process.

Run: .venv/bin/python bench/heartbeats.py [--agents 1000 10000] [--rate 5000] [--duration 20]
     [--warmup 5] [--db sqlite|postgresql://postgres@127.0.0.1:5432/test] [--profile DIR]
     [--compare REV [--repeat K] [--base-without-uvloop]]
     [--replicas K [--bus nats://127.0.0.1:4222]] [--record]

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

Client settings mirror `loom worker start` (ping_interval=20, no permessage-deflate); the
fleet is bench/heartbeats_fleet.py. Both processes are on the same machine, so on 2 cores the
client's own CPU competes with the coordinator's and its event-loop lag is part of the
measured round trip (reported apart).

``--replicas K`` (PostgreSQL only) starts K coordinators as replicas of one network (one
schema, ``--bus`` NATS, ``--replica-id r1…rK``) and spreads the agents round-robin over
them: acks/s, round trips and coordinator CPU are summed over the replicas. During
registration the bench also prints how many cores the coordinators, this client and
everything else (the database, other users of the machine) used.

``--compare REV`` measures before/after in one run: the coordinator of git revision REV (a
temporary worktree, ``PYTHONPATH`` its ``src``) and the working tree's, alternating, each
``--repeat`` times per N; it prints each run, the medians, and the ratios current/REV.
``--profile DIR`` runs the coordinator under cProfile (whole run: handshakes and beats) and
prints its top functions by own time (cProfile slows it: read shares, not absolute times).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import os
import pstats
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from heartbeats_code import Code, hide_uvloop_dir, worktree
from heartbeats_fleet import Agent, Beater, Stats, handshake, pct, receive
from loom.protocol.identity import KeyPair, binding_message

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = Path(__file__).resolve().parent.parent
FLUSH_S = 1.0  # Settings.heartbeat_flush_s


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / hz, sum(fields) / hz


def cpu_all(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds of all the coordinator processes (replicas summed)."""
    return sum(cpu_seconds(p.pid) for p in procs)


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
    code: str = "current"
    handshake_cpu_ms: float = 0.0
    registration_cpu: str = ""
    replicas: int = 1


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


def summarize_profile(path: Path, top: int = 25) -> list[str]:
    """The coordinator's top functions by own time, from its cProfile dump."""
    if not path.exists():
        return [f"no profile written at {path}"]
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values()) or 1.0
    ranked = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    lines = [f"{total:.1f} s profiled; own%  incl s  calls  function"]
    for (file, line, name), (_cc, calls, own, incl, _callers) in ranked:
        where = "/".join(file.rsplit("/", 2)[-2:]) + f":{line}"
        lines.append(f"{100 * own / total:5.1f} {incl:7.2f} {calls:7d}  {name} {where}")
    return lines


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:]


def start_coordinator(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


#: `python -c` launcher of `loom` under cProfile; SIGUSR1 writes the profile (uvicorn
#: re-raises SIGTERM after its shutdown, which would kill cProfile's own writer).
PROFILED = """
import cProfile, signal, sys
from loom.entry import main
profile = cProfile.Profile()
def dump(*_):
    profile.disable()
    profile.dump_stats({out!r})
signal.signal(signal.SIGUSR1, dump)
profile.enable()
main()
"""


async def run_one(n: int, args: argparse.Namespace, code: Code) -> Result:
    result = Result(agents=n, rate=args.rate, db="postgresql" if args.db != "sqlite" else "sqlite")
    result.code = code.label
    result.replicas = args.replicas
    tmp = Path(tempfile.mkdtemp(prefix="loom-bench-hb-"))
    db = Db(args.db, tmp)
    await db.create()
    k = args.replicas
    ports = [free_port() for _ in range(k)]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    logs = [tmp / ("coordinator.log" if k == 1 else f"coordinator-r{i + 1}.log") for i in range(k)]
    prof = (
        Path(args.profile) / f"coordinator-{n}-{result.db}-{code.label}.prof"
        if args.profile
        else None
    )
    procs: list[subprocess.Popen[bytes]] = []
    for i, port in enumerate(ports):
        env = {**os.environ, "LOOM_HOME": str(tmp / f"home-{i}")}
        env["PYTHONPATH"] = str(code.root / "src")  # this code, not whatever is installed
        if code.hide_uvloop:  # as it ran before uvloop was a dependency
            env["PYTHONPATH"] = f"{hide_uvloop_dir()}{os.pathsep}{env['PYTHONPATH']}"
        cmd = [sys.executable]
        if prof is not None and i == 0:  # with replicas, the first one is profiled
            prof.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["-c", PROFILED.format(out=str(prof))]
        else:
            cmd += ["-m", "loom"]
        cmd += ["coordinator", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--db", db.coordinator_url(), "--log-level", "warning"]
        if k > 1:  # replicas of one network: one PostgreSQL schema, NATS between them
            cmd += ["--bus", args.bus, "--replica-id", f"r{i + 1}"]
        procs.append(start_coordinator(cmd, env, logs[i], code.root))
        if i == 0 and k > 1:  # it migrates the fresh schema: the others start after it
            await wait_healthy(bases[0], procs[0], logs[0])
    proc = procs[0]
    stats = Stats()
    beater = Beater(stats)
    agents: list[Agent] = []
    receivers: list[asyncio.Task[None]] = []
    try:
        for base, one, log in zip(bases, procs, logs, strict=True):
            await wait_healthy(base, one, log)
        owners = [KeyPair.generate() for _ in range(max(1, n // 100))]
        for i in range(n):
            node, owner = KeyPair.generate(), owners[i % len(owners)]
            binding = owner.sign(binding_message(node.public_hex)).hex()
            agents.append(Agent(node=node, owner=owner, binding_sig=binding))
        urls = [base.replace("http://", "ws://") + "/v1/agent/ws" for base in bases]
        beater_task = asyncio.create_task(beater.run())
        sem = asyncio.Semaphore(args.concurrency)
        failures: collections.Counter[str] = collections.Counter()

        async def join(agent: Agent, url: str) -> None:
            async with sem:
                try:
                    await handshake(agent, url, stats)
                except Exception as exc:
                    failures[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
                    return
            receivers.append(asyncio.create_task(receive(agent, stats)))
            beater.agents.append(agent)

        t0 = time.perf_counter()
        reg_cpu0, reg_client0, reg_busy0 = cpu_all(procs), time.process_time(), system_busy()[0]
        await asyncio.gather(*(join(a, urls[i % k]) for i, a in enumerate(agents)))
        reg_coord = cpu_all(procs) - reg_cpu0
        result.handshake_cpu_ms = 1000 * reg_coord / max(1, n)
        result.handshake_s = time.perf_counter() - t0
        reg_client = time.process_time() - reg_client0
        reg_others = system_busy()[0] - reg_busy0 - reg_coord - reg_client
        result.registration_cpu = (
            f"during registration (cores): coordinator{'s' if k > 1 else ''} "
            f"{reg_coord / result.handshake_s:.2f}, bench client "
            f"{reg_client / result.handshake_s:.2f}, others (database, other users) "
            f"{reg_others / result.handshake_s:.2f}"
        )
        result.handshake_p50_ms = pct(stats.handshake_ms, 0.5)
        result.handshake_p99_ms = pct(stats.handshake_ms, 0.99)
        if failures:
            print(f"  handshake failures: {dict(failures)}", file=sys.stderr)
        print(
            f"  N={n}: {len(beater.agents)} agents in {result.handshake_s:.1f} s "
            f"({result.registration_cpu}); warming up at {args.rate}/s",
            file=sys.stderr,
        )

        beater.per_agent_interval_s = n / args.rate
        await asyncio.sleep(args.warmup)
        start = time.perf_counter()
        stats.window = (start, start + args.duration)
        stats.tick_lag_ms.clear()
        coord_cpu0, client0 = cpu_all(procs), time.process_time()
        busy0, _ = system_busy()
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
        result.coord_cpu = (cpu_all(procs) - coord_cpu0) / args.duration
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
        if prof is not None:  # the profile is written on SIGUSR1 (uvicorn dies of SIGTERM)
            proc.send_signal(signal.SIGUSR1)
            for _ in range(300):  # up to 60 s
                if prof.exists() or proc.poll() is not None:
                    break
                await asyncio.sleep(0.2)
        for one in procs:
            one.send_signal(signal.SIGTERM)
        for one in procs:
            try:
                one.wait(timeout=120 if prof is not None else 30)
            except subprocess.TimeoutExpired:
                one.kill()
                one.wait()
        if prof is not None:
            result.profile_top = summarize_profile(prof)
        await db.drop()
        lines = [ln for log in logs for ln in log.read_text(errors="replace").splitlines()]
        errors = [ln for ln in lines if "ERROR" in ln]
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
    "| code | agents | target/s | achieved acks/s | p50 ms | p99 ms | max ms | handshakes: all N "
    "(p50/p99 ms each) | coordinator CPU per handshake ms | coordinator CPU (µs/beat) | "
    "client CPU | other procs CPU | client lag p99 ms | DB backlog max | DB keeps up |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: "
    "| ---: | --- |"
)


def row(r: Result) -> str:
    code = r.code + (f" ({r.replicas} replicas)" if r.replicas > 1 else "")
    return (
        f"| {code} | {r.agents:,} | {r.rate:,} | {r.achieved:,.0f} | {r.p50_ms:.1f} | "
        f"{r.p99_ms:.1f} | {r.max_ms:.0f} | {r.handshake_s:.1f} s ({r.handshake_p50_ms:.0f}/"
        f"{r.handshake_p99_ms:.0f}) | {r.handshake_cpu_ms:.2f} | {100 * r.coord_cpu:.0f} % "
        f"({r.us_per_beat:.0f}) | {100 * r.client_cpu:.0f} % | {100 * r.others_cpu:.0f} % | "
        f"{r.client_lag_p99_ms:.1f} | {r.backlog_max:,.0f} | {'yes' if r.db_ok else 'NO'} |"
    )


#: Result fields compared by --compare (lower is better for all but achieved).
COMPARED = ("us_per_beat", "handshake_cpu_ms", "handshake_s", "achieved", "p50_ms", "p99_ms")


def median_result(runs: list[Result]) -> Result:
    """Field-wise medians of repeated runs (same code, same N)."""
    med = dataclasses.replace(runs[0])
    for name in (f.name for f in dataclasses.fields(Result)):
        values = [getattr(r, name) for r in runs]
        if all(isinstance(v, float) for v in values):
            setattr(med, name, statistics.median(values))
    med.db_ok = all(r.db_ok for r in runs)
    med.code = f"{runs[0].code} (median of {len(runs)})"
    return med


def ratios(current: Result, base: Result) -> str:
    parts = []
    for name in COMPARED:
        b, c = getattr(base, name), getattr(current, name)
        parts.append(f"{name} {c / b:.2f}×" if b else f"{name} n/a")
    return "current/base: " + ", ".join(parts)


def record(lines_out: list[str], args: argparse.Namespace, argv: str, db: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    today = datetime.date.today().isoformat()
    lines = [
        "",
        f"## heartbeats ({db})" if args.db != "sqlite" else "## heartbeats",
        "",
        f"{today} · {os.cpu_count()}-core machine, load average {os.getloadavg()[0]:.1f} at "
        f"the end, Python {sys.version.split()[0]} · `.venv/bin/python bench/heartbeats.py {argv}`",
        "",
        HEADER,
        *lines_out,
        "",
    ]
    RESULTS.write_text(text.rstrip("\n") + "\n" + "\n".join(lines))


def report(r: Result) -> None:
    print(row(r), flush=True)
    print(f"  {r.db_note}; sent {r.sent_rate:,.0f}/s; closes {r.closed or 'none'}", flush=True)
    print(f"  {r.registration_cpu}", flush=True)
    for line in r.profile_top:
        print("   ", line)


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
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="coordinator replicas (needs --db postgresql://…): agents spread round-robin, "
        "acks and CPU summed",
    )
    parser.add_argument("--bus", default="nats://127.0.0.1:4222", help="NATS for --replicas")
    parser.add_argument("--profile", metavar="DIR", help="cProfile the coordinator into DIR")
    parser.add_argument("--compare", metavar="REV", help="also run git revision REV's coordinator")
    parser.add_argument("--repeat", type=int, default=1, help="runs per N (and per code)")
    parser.add_argument(
        "--base-without-uvloop",
        action="store_true",
        help="run --compare REV's coordinator with uvloop hidden (asyncio's loop, as before)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, DB)")
    parser.add_argument("--verbose", action="store_true", help="print DB samples each second")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    if args.replicas < 1 or (args.replicas > 1 and args.db == "sqlite"):
        parser.error("--replicas N needs N >= 1, and --db postgresql://… when N > 1")
    hard = raise_nofile()
    if max(args.agents) + 200 > hard:
        parser.error(f"RLIMIT_NOFILE hard limit {hard} is too low for {max(args.agents)} agents")
    out: list[str] = []
    db = "postgresql" if args.db != "sqlite" else "sqlite"
    with contextlib.ExitStack() as stack:
        codes = [Code("current")]
        if args.compare:
            base = Code(
                args.compare + (" (asyncio loop)" if args.base_without_uvloop else ""),
                stack.enter_context(worktree(args.compare)),
                hide_uvloop=args.base_without_uvloop,
            )
            codes.insert(0, base)
        for n in args.agents:
            runs: dict[str, list[Result]] = {c.label: [] for c in codes}
            for _ in range(args.repeat):
                for code in codes:  # alternating: both see the same machine load
                    r = asyncio.run(run_one(n, args, code))
                    runs[code.label].append(r)
                    report(r)
            meds = {label: median_result(rs) for label, rs in runs.items()}
            out += [row(m) for m in meds.values()]
            if args.compare:
                line = ratios(meds["current"], meds[codes[0].label])
                print(line, flush=True)
                out.append(f"| {line} |")
    print()
    print(HEADER)
    print("\n".join(out))
    print(f"load average at the end: {os.getloadavg()}")
    if args.record:
        record(out, args, " ".join(sys.argv[1:]).replace(" --record", ""), db)


if __name__ == "__main__":
    main()
