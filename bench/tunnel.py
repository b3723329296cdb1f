"""Tunnel throughput: MB/s through the relay vs a direct loopback copy, as a ratio.

Path measured: local forward port (the `loom cluster forward` code, in this process) →
coordinator (a `loom coordinator serve` subprocess) → head agent's WebSocket (a real
`Agent` with its `AgentTunnel`, in a subprocess, no Ray) → a TCP server on the "head".
Upload: the bench sends `--mb` MiB to a sink that counts them and answers with the count
after EOF. Download: a source sends `--mb` MiB to the bench. Direct: the same servers
reached on loopback. Median of `--runs` runs each.

    .venv/bin/python bench/tunnel.py [--mb 64] [--runs 5] [--append-results]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loom.agent.config import AgentConfig
from loom.agent.inventory import NoGpus
from loom.agent.main import Agent, handler, handlers
from loom.agent.tunnel import AgentTunnel
from loom.agent.verification import ChallengeHandler
from loom.client.forward import background_forward
from loom.client.sdk import LoomClient
from loom.protocol.commands import (
    MemberStart,
    MemberStarted,
    MemberStop,
    MemberStopped,
    MemberSync,
    MemberSynced,
)
from loom.protocol.identity import KeyPair

RESULTS = Path(__file__).with_name("RESULTS.md")
BLOCK = os.urandom(1 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the "head": an agent whose head member's dashboard port is a sink/source server -----


async def _head_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = (await reader.readline()).decode().split()
    if line and line[0] == "sink":
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        writer.write(f"{total}\n".encode())
    elif line and line[0] == "source":
        for _ in range(int(line[1])):
            writer.write(BLOCK)
            await writer.drain()
    await writer.drain()
    writer.close()


async def run_head(url: str, port: int, work: Path) -> None:
    server = await asyncio.start_server(_head_server, "127.0.0.1", port)
    config = AgentConfig(
        coordinator=url, name="bench-head", region="eu-west", country="", price="0.1", work_dir=work
    )
    agent = Agent(config, node_key=KeyPair.generate(), owner_key=KeyPair.generate(), probe=NoGpus())

    async def start(_cmd: MemberStart) -> MemberStarted:
        return MemberStarted(
            gcs_address="127.0.0.2:6379",
            dashboard_url=f"http://127.0.0.1:{port}",
            client_address="",
            ray_node_id="b" * 8,
        )

    async def stop(_cmd: MemberStop) -> MemberStopped:
        return MemberStopped(stopped=True)

    async def sync(_cmd: MemberSync) -> MemberSynced:
        return MemberSynced()

    agent.handlers.update(
        handlers(handler(MemberStart, start), handler(MemberStop, stop), handler(MemberSync, sync))
    )
    agent.handlers.update(ChallengeHandler(agent).handlers())
    tunnel = AgentTunnel(agent.send_bytes, lambda: {("127.0.0.1", port)})
    agent.on_binary = tunnel.on_frame
    agent.on_disconnect.append(tunnel.reset)
    agent.install_signal_handlers()
    async with server:
        await agent.run()


# -- the user side -----------------------------------------------------------------------


def upload(port: int, mb: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.perf_counter()
        sock.sendall(b"sink\n")
        for _ in range(mb):
            sock.sendall(BLOCK)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile().readline()
        elapsed = time.perf_counter() - t0
    assert int(answer) == mb << 20, answer
    return mb / elapsed


def download(port: int, mb: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.perf_counter()
        sock.sendall(f"source {mb}\n".encode())
        total = 0
        while data := sock.recv(1 << 20):
            total += len(data)
        elapsed = time.perf_counter() - t0
    assert total == mb << 20, total
    return mb / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--head", nargs=3, metavar=("URL", "PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.head:
        asyncio.run(run_head(args.head[0], int(args.head[1]), Path(args.head[2])))
        return 0

    home = Path(tempfile.mkdtemp(prefix="loom-tunnel-bench-"))
    url = f"http://127.0.0.1:{free_port()}"
    head_port = free_port()
    env = dict(os.environ, LOOM_HOME=str(home), LOOM_COORDINATOR=url)
    log = open(home / "bench.log", "ab")  # noqa: SIM115
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "loom", "coordinator", "serve", "--port", url.rsplit(":", 1)[1],
         "--faucet"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    head = subprocess.Popen(
        [sys.executable, __file__, "--head", url, str(head_port), str(home / "head")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    key = KeyPair.generate()
    try:
        client = LoomClient(url, key)
        _wait(lambda: bool(client.health()), 60, "the coordinator")
        client.request("POST", "/v1/credits/deposit", json={"amount": "100"})
        _wait(lambda: any(n.state == "available" for n in client.nodes()), 300, "the head agent")
        client.create_cluster({"name": "bench", "nodes": 1, "resources": {"cpus": 1}})
        cluster = client.wait_cluster("bench", timeout=60)
        assert cluster.state == "running", cluster.reason
        rows = []
        with background_forward(url, key, "bench", "dashboard") as fwd_port:
            for name, fn in (("upload", upload), ("download", download)):
                fn(fwd_port, 4)  # warm-up
                relay = statistics.median(fn(fwd_port, args.mb) for _ in range(args.runs))
                direct = statistics.median(fn(head_port, args.mb) for _ in range(args.runs))
                rows.append((name, relay, direct, relay / direct))
        load = os.getloadavg()
    finally:
        head.terminate()
        coordinator.terminate()
        for proc in (head, coordinator):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    lines = [
        "| direction | relay MB/s | direct loopback MB/s | ratio |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {n} | {r:.1f} | {d:.1f} | {q:.3f} |" for n, r, d, q in rows),
    ]
    print(f"tunnel throughput, {args.mb} MiB per run, median of {args.runs} runs")
    print("\n".join(lines))
    print(f"load average after: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}")
    if args.append_results:
        _append(args, lines, load)
    return 0


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _append(args: argparse.Namespace, lines: list[str], load: tuple[float, ...]) -> None:
    text = [
        "",
        "## tunnel",
        "",
        f"2026-11-25 · 2-core x86_64 VM (python-svc), Python 3.11 · "
        f"`.venv/bin/python bench/tunnel.py --mb {args.mb} --runs {args.runs}`",
        "",
        *lines,
        "",
        "Relay path: local forward port → coordinator (uvicorn, separate process) → head "
        "agent WebSocket (separate process) → TCP server; one stream, 256 KiB credit window, "
        f"64 KiB DATA frames. Direct: the same TCP server on loopback. Load average after "
        f"the run: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} (shared cores).",
        "",
    ]
    with RESULTS.open("a") as f:
        f.write("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
