"""Benchmark: the floor under bench/heartbeats.py — the same server stack with no app.

Run: .venv/bin/python bench/heartbeats_bare.py [--agents 1000] [--rate 5000] [--duration 10]
     [--ws websockets-sansio|websockets|wsproto|raw|all ...] [--loop asyncio|uvloop] [--repeat K]

A bare ASGI app under uvicorn with the coordinator's own server settings
(``loom.coordinator.server``: the same WebSocket implementation and event loop, no
permessage-deflate, pings every 20 s) speaks just enough of the agent protocol for the
fleet of bench/heartbeats_fleet.py: hello with a nonce → auth (read, not checked) →
welcome, then a ``heartbeat_ack`` per heartbeat (parsed with ``json``). No database, no
signatures, no buffer, no loops. Its CPU per beat is what uvicorn, the websockets library,
the event loop and the kernel cost per beat on this machine; the coordinator's figure minus
this one is the application's own cost.

``--ws`` picks the server stack: one of uvicorn's WebSocket implementations
(``websockets-sansio``, uvicorn's default and the coordinator's; ``websockets``, its
legacy-protocol one; ``wsproto``) or ``raw``, a bare ``websockets.asyncio.server`` with no
ASGI at all (for comparison: the coordinator cannot run on it). ``--ws all`` runs each in
turn, alternating, ``--repeat`` times, and prints each one's median µs/beat. ``--loop``
picks the event loop (default: the coordinator's, uvloop where installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from heartbeats import cpu_seconds, free_port, raise_nofile
from heartbeats_fleet import Agent, Beater, Stats, handshake, pct, receive
from loom.coordinator.server import loop_name, uvicorn_options
from loom.protocol.identity import KeyPair, binding_message
from loom.protocol.messages import MAX_FRAME_BYTES

Scope = dict[str, Any]


async def bare_app(scope: Scope, receive_: Any, send: Any) -> None:
    """The agent socket with nothing behind it."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive_()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await receive_()  # websocket.connect
    await send({"type": "websocket.accept"})
    hello = {"type": "hello", "protocol": 1, "min_protocol": 1, "nonce": os.urandom(32).hex()}
    await send({"type": "websocket.send", "text": json.dumps(hello)})
    await receive_()  # auth: not checked
    welcome = {"type": "welcome", "node_id": "bare", "heartbeat_interval_s": 5.0, "state": "x"}
    await send({"type": "websocket.send", "text": json.dumps(welcome)})
    while True:
        message = await receive_()
        if message["type"] == "websocket.disconnect":
            return
        beat = json.loads(message.get("text") or "{}")
        ack = f'{{"type":"heartbeat_ack","seq":{int(beat.get("seq", 0))}}}'
        await send({"type": "websocket.send", "text": ack})


async def raw_handler(ws: Any) -> None:
    """The same protocol on a bare `websockets.asyncio.server` (no uvicorn, no ASGI)."""
    hello = {"type": "hello", "protocol": 1, "min_protocol": 1, "nonce": os.urandom(32).hex()}
    await ws.send(json.dumps(hello))
    await ws.recv()  # auth: not checked
    welcome = {"type": "welcome", "node_id": "bare", "heartbeat_interval_s": 5.0, "state": "x"}
    await ws.send(json.dumps(welcome))
    async for text in ws:
        beat = json.loads(text or "{}")
        await ws.send(f'{{"type":"heartbeat_ack","seq":{int(beat.get("seq", 0))}}}')


async def serve_raw(port: int) -> None:
    from websockets.asyncio.server import serve as ws_serve

    async with ws_serve(
        raw_handler,
        "127.0.0.1",
        port,
        compression=None,
        max_size=MAX_FRAME_BYTES,
        ping_interval=20,
        ping_timeout=20,
    ) as server:
        await server.serve_forever()


def serve(port: int, ws: str, loop: str) -> None:
    if ws == "raw":
        if loop == "uvloop":
            import uvloop

            uvloop.run(serve_raw(port))
        else:
            asyncio.run(serve_raw(port))
        return
    import uvicorn

    options = {**uvicorn_options(), "ws": ws, "loop": loop}  # the coordinator's but these two
    uvicorn.run(bare_app, host="127.0.0.1", port=port, log_level="warning", **options)


async def run(
    args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int, label: str
) -> float:
    """One run against the server in ``proc``; returns its CPU µs per beat."""
    try:
        url = f"ws://127.0.0.1:{port}/v1/agent/ws"
        for _ in range(100):
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        stats = Stats()
        beater = Beater(stats)
        owner = KeyPair.generate()
        agents = []
        for _ in range(args.agents):
            node = KeyPair.generate()
            binding = owner.sign(binding_message(node.public_hex)).hex()
            agents.append(Agent(node=node, owner=owner, binding_sig=binding))
        beater_task = asyncio.create_task(beater.run())
        sem = asyncio.Semaphore(200)
        receivers = []

        async def join(agent: Agent) -> None:
            async with sem:
                await handshake(agent, url, stats)
            receivers.append(asyncio.create_task(receive(agent, stats)))
            beater.agents.append(agent)

        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        await asyncio.gather(*(join(a) for a in agents))
        reg_s, reg_cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
        beater.per_agent_interval_s = args.agents / args.rate
        await asyncio.sleep(args.warmup)
        start = time.perf_counter()
        stats.window = (start, start + args.duration)
        stats.tick_lag_ms.clear()
        cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
        await asyncio.sleep(args.duration)
        cpu = cpu_seconds(proc.pid) - cpu0
        client = (time.process_time() - client0) / args.duration
        achieved = stats.acks_in_window / args.duration
        beater.running = False
        await beater_task
        us_per_beat = 1e6 * cpu / max(achieved * args.duration, 1)
        print(
            f"{label}, {args.agents:,} agents: {reg_s:.1f} s to connect "
            f"({1000 * reg_cpu / args.agents:.2f} ms server CPU each); {achieved:,.0f} acks/s "
            f"(target {args.rate:,}), p50 {pct(stats.rtts_ms, 0.5):.1f} ms, p99 "
            f"{pct(stats.rtts_ms, 0.99):.1f} ms; server CPU {100 * cpu / args.duration:.0f} % "
            f"= {us_per_beat:.0f} µs/beat; bench client "
            f"{100 * client:.0f} %, its loop lag p99 {pct(stats.tick_lag_ms, 0.99):.1f} ms; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for agent in agents:
            if agent.ws is not None:
                await agent.ws.close()
        for task in receivers:
            task.cancel()
        return us_per_beat
    finally:
        proc.terminate()
        proc.wait(timeout=30)


STACKS = ("websockets-sansio", "websockets", "wsproto", "raw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--ws",
        nargs="+",
        default=["websockets-sansio"],
        choices=[*STACKS, "all"],
        help="server stack(s): a uvicorn ws implementation, or raw websockets.asyncio.server",
    )
    parser.add_argument("--loop", default=loop_name(), choices=["asyncio", "uvloop"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per stack (alternating)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    stacks = list(STACKS) if "all" in args.ws else args.ws
    if args.serve:
        serve(args.serve, stacks[0], args.loop)
        return
    raise_nofile()
    results: dict[str, list[float]] = {ws: [] for ws in stacks}
    for _ in range(args.repeat):
        for ws in stacks:  # alternating: each sees the same machine load
            port = free_port()
            cmd = [sys.executable, __file__, "--serve", str(port), "--ws", ws]
            proc = subprocess.Popen([*cmd, "--loop", args.loop])
            label = f"{ws if ws == 'raw' else 'uvicorn ' + ws} ({args.loop})"
            results[ws].append(asyncio.run(run(args, proc, port, label)))
    if args.repeat > 1 or len(stacks) > 1:
        print(f"medians of {args.repeat} ({args.loop} loop, load {os.getloadavg()[0]:.1f}):")
        for ws, values in results.items():
            runs = ", ".join(f"{v:.0f}" for v in values)
            print(f"  {ws:>18}: {statistics.median(values):5.0f} µs/beat (runs {runs})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
