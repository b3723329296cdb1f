"""Benchmark: the coordinator application's own CPU per heartbeat, without sockets.

Run: .venv/bin/python bench/heartbeats_app.py [--agents 50] [--beats 20000] [--repeat 3]
     [--compare REV]

The real ASGI app (`create_app`, its lifespan, SQLite in a temporary directory) is driven
in this process through in-memory ASGI ``receive``/``send``: each simulated agent does the
real signed handshake, then beats go round-robin over the agents, each waiting for its
``heartbeat_ack`` before its next (one in flight per agent). Reported: process CPU time per
beat (µs) over the beats — the app's part (Starlette, the receive loop, parsing, the
buffer, the ack, the flush and the background loops) — and per handshake. Uvicorn's and
the websockets library's per-frame work is not in it (it is the same whatever the app
does), which is why this figure is steadier on a loaded machine than bench/heartbeats.py's.

``--compare REV`` runs each repetition once with git revision REV's ``src`` (a temporary
worktree) and once with this tree's, alternating, in fresh processes, and prints the
medians and the ratio current/REV.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEAT = '{{"type":"heartbeat","seq":{seq},"load":{{"cpu_percent":12.5,"mem_used_mb":2048,"gpu_util_percent":[]}}}}'  # noqa: E501


class _Lifespan:
    """Runs the app's lifespan (start-up: migrations, loops) on this loop."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()

    async def _receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            self.started.set()
        elif message["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"start-up failed: {message.get('message')}")
        elif message["type"].startswith("lifespan.shutdown"):
            self.stopped.set()

    async def __aenter__(self) -> _Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self._receive, self._send))
        await self.inbox.put({"type": "lifespan.startup"})
        await asyncio.wait_for(self.started.wait(), 120)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self.stopped.wait(), 60)
        self.task.cancel()


class _Agent:
    """One agent's WebSocket as in-memory ASGI messages."""

    def __init__(self, app: Any, index: int) -> None:
        self.app = app
        self.index = index
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[str] = asyncio.Queue()

    async def _receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await self.outbox.put(message.get("text") or "")
        elif message["type"] == "websocket.close":
            await self.outbox.put(json.dumps({"type": "closed", "code": message.get("code")}))

    async def connect(self) -> None:
        from loom.protocol.identity import KeyPair, agent_auth_message, binding_message
        from loom.protocol.messages import Auth, Inventory
        from loom.protocol.version import PROTOCOL_VERSION

        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": "/v1/agent/ws",
            "raw_path": b"/v1/agent/ws",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 10_000 + self.index),
            "server": ("127.0.0.1", 8000),
            "subprotocols": [],
            "state": {},
        }
        self.task = asyncio.create_task(self.app(scope, self._receive, self._send))
        await self.inbox.put({"type": "websocket.connect"})
        hello = json.loads(await self.outbox.get())
        node, owner = KeyPair.generate(), KeyPair.generate()
        auth = Auth(
            protocol=PROTOCOL_VERSION,
            node_key=node.public_hex,
            owner_key=owner.public_hex,
            binding_sig=owner.sign(binding_message(node.public_hex)).hex(),
            nonce_sig=node.sign(agent_auth_message(hello["nonce"])).hex(),
            name=f"app-bench-{self.index}",
            region="eu-west",
            price="0.30",
            inventory=Inventory(cpu_model="bench", cpu_cores=2, ram_mb=4096, disk_free_mb=1000),
        )
        await self.inbox.put({"type": "websocket.receive", "text": auth.model_dump_json()})
        while True:
            msg = json.loads(await self.outbox.get())
            if msg["type"] == "welcome":
                return
            if msg["type"] == "command":  # member.sync on connect: done
                ack = {"type": "ack", "id": msg["id"], "ok": True, "result": {}}
                await self.inbox.put({"type": "websocket.receive", "text": json.dumps(ack)})
            elif msg["type"] == "closed":
                raise RuntimeError(f"refused: {msg}")

    async def beat(self, seq: int) -> None:
        await self.inbox.put({"type": "websocket.receive", "text": BEAT.format(seq=seq)})
        while True:
            msg = json.loads(await self.outbox.get())
            if msg["type"] == "heartbeat_ack":
                return
            if msg["type"] == "command":  # e.g. a hardware challenge: refused
                ack = {"type": "ack", "id": msg["id"], "ok": False, "error": "bench: no prover"}
                await self.inbox.put({"type": "websocket.receive", "text": json.dumps(ack)})

    async def close(self) -> None:
        await self.inbox.put({"type": "websocket.disconnect", "code": 1000})
        with_timeout = asyncio.wait_for(self.task, 10)
        try:
            await with_timeout
        except (TimeoutError, Exception):
            self.task.cancel()


async def measure(agents: int, beats: int) -> dict[str, float]:
    """One measurement in this process (whatever `loom` it imports)."""
    from loom.coordinator.app import create_app
    from loom.coordinator.config import Settings

    tmp = Path(tempfile.mkdtemp(prefix="loom-bench-app-"))
    os.environ["LOOM_HOME"] = str(tmp / "home")
    settings = Settings(db_url=f"sqlite:///{tmp}/coordinator.db", host="127.0.0.1", port=8000)
    app = create_app(settings)
    try:
        async with _Lifespan(app):
            fleet = [_Agent(app, i) for i in range(agents)]
            cpu0 = time.process_time()
            for agent in fleet:
                await agent.connect()
            handshake_ms = 1000 * (time.process_time() - cpu0) / agents
            for agent in fleet:  # warm up: every agent beats once
                await agent.beat(0)
            per_agent = max(1, beats // agents)
            cpu0, wall0 = time.process_time(), time.perf_counter()

            async def run(agent: _Agent) -> None:
                for seq in range(1, per_agent + 1):
                    await agent.beat(seq)

            await asyncio.gather(*(run(a) for a in fleet))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            for agent in fleet:
                await agent.close()
        done = per_agent * agents
        return {
            "us_per_beat": 1e6 * cpu / done,
            "beats_per_cpu_s": done / cpu,
            "wall_beats_per_s": done / wall,
            "handshake_cpu_ms": handshake_ms,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_in(src: Path, args: argparse.Namespace) -> dict[str, float]:
    """One measurement in a fresh process importing `loom` from ``src``."""
    cmd = [sys.executable, __file__, "--child", "--agents", str(args.agents)]
    cmd += ["--beats", str(args.beats)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--beats", type=int, default=20_000, help="beats in the measurement")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(asyncio.run(measure(args.agents, args.beats))))
        return
    codes: dict[str, Path] = {"current": REPO / "src"}
    where = None
    if args.compare:
        where = Path(tempfile.mkdtemp(prefix="loom-bench-app-base-"))
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), args.compare],
            check=True,
            capture_output=True,
        )
        codes = {args.compare[:12]: where / "src", **codes}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in codes}
    try:
        for i in range(args.repeat):
            for label, src in codes.items():  # alternating: the same machine load for both
                r = run_in(src, args)
                runs[label].append(r)
                print(
                    f"run {i + 1} {label}: {r['us_per_beat']:.1f} µs/beat, "
                    f"{r['handshake_cpu_ms']:.1f} ms/handshake (CPU), "
                    f"{r['wall_beats_per_s']:,.0f} beats/s wall; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        if where is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                capture_output=True,
            )
    medians = {
        label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()
    }
    for label, m in medians.items():
        print(
            f"median {label}: {m['us_per_beat']:.1f} µs/beat (app CPU), "
            f"{m['handshake_cpu_ms']:.1f} ms/handshake, {m['wall_beats_per_s']:,.0f} beats/s wall"
        )
    if args.compare:
        base, cur = medians[args.compare[:12]], medians["current"]
        beat_ratio = cur["us_per_beat"] / base["us_per_beat"]
        handshake_ratio = cur["handshake_cpu_ms"] / base["handshake_cpu_ms"]
        print(
            f"current/{args.compare[:12]}: µs/beat {beat_ratio:.2f}×, "
            f"handshake CPU {handshake_ratio:.2f}×"
        )
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
