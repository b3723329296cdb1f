"""A real `Agent` (no Ray) whose one-node "cluster head" is a set of TCP test servers.

`member.start` answers with a dashboard URL and client address that point at servers on
the agent's own loop; the agent's tunnel (`loom.agent.tunnel.AgentTunnel`) may reach only
those. The dashboard server speaks a tiny line protocol chosen by the client's first line:

- ``echo``        echo every byte until EOF, then half-close back and close
- ``hello``       write ``hello`` and close at once (the far side closes first)
- ``flood N``     write N bytes (``pattern(N)``) as fast as the socket takes them, then close
- ``sink``        read nothing until `sink_go` is set, then read to EOF and record it
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Any

from loom.agent.config import AgentConfig
from loom.agent.inventory import NoGpus
from loom.agent.main import Agent, Handler, handler, handlers
from loom.agent.tunnel import AgentTunnel
from loom.protocol.commands import (
    COMMANDS,
    MemberStart,
    MemberStarted,
    MemberStop,
    MemberStopped,
    MemberSync,
    MemberSynced,
)
from loom.protocol.identity import KeyPair, node_id_for

CHUNK = bytes(range(256)) * 4096  # 1 MiB


def pattern(n: int) -> bytes:
    return (CHUNK * (n // len(CHUNK) + 1))[:n]


async def _hang(_cmd: Any) -> Any:
    await asyncio.Event().wait()


class _Handlers(dict[str, Handler[Any]]):
    """Commands of the test agent; hardware challenges go unanswered (no prover here)."""

    def get(self, key: str, default: Any = None) -> Any:
        if key.startswith("challenge.") and key in COMMANDS:
            return handler(COMMANDS[key], _hang)
        return super().get(key, default)


class TunnelHead:
    def __init__(self, coordinator_url: str, work_dir: Path, name: str = "head0") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.node_key = KeyPair.generate()
        self.owner_key = KeyPair.generate()
        self.flood_written = 0
        self.sink_go = threading.Event()
        self.sink_received: list[tuple[int, str]] = []
        self.open_server_conns = 0
        self._servers: list[asyncio.Server] = []
        self.dashboard_port, self.client_port = self.call(self._start_servers())
        config = AgentConfig(
            coordinator=coordinator_url,
            name=name,
            region="eu-west",
            country="",
            price="0.25",
            work_dir=work_dir,
        )
        self.agent = Agent(config, node_key=self.node_key, owner_key=self.owner_key, probe=NoGpus())
        self.agent.handlers = _Handlers(
            handlers(
                handler(MemberStart, self._member_start),
                handler(MemberStop, self._stopped),
                handler(MemberSync, self._synced),
            )
        )
        self.allowed = {("127.0.0.1", self.dashboard_port), ("127.0.0.1", self.client_port)}
        self.tunnel = AgentTunnel(self.agent.send_bytes, lambda: set(self.allowed))
        self.agent.on_binary = self.tunnel.on_frame
        self.agent.on_disconnect.append(self.tunnel.reset)
        self._run = asyncio.run_coroutine_threadsafe(self.agent.run(), self.loop)

    @property
    def node_id(self) -> str:
        return node_id_for(self.node_key.public_hex)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def streams(self) -> int:
        async def count() -> int:
            return len(self.tunnel.streams)

        return int(self.call(count()))

    def close(self) -> None:
        self.sink_go.set()  # no sink thread may outlive the test
        self.loop.call_soon_threadsafe(self.agent.stop)
        with contextlib.suppress(Exception):
            self._run.result(15)

        async def stop_servers() -> None:
            for server in self._servers:
                server.close()

        with contextlib.suppress(Exception):
            self.call(stop_servers(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _stopped(self, _cmd: MemberStop) -> MemberStopped:
        return MemberStopped(stopped=True)

    async def _synced(self, _cmd: MemberSync) -> MemberSynced:
        return MemberSynced()

    async def _member_start(self, _cmd: MemberStart) -> MemberStarted:
        return MemberStarted(
            gcs_address="127.0.0.2:6379",
            dashboard_url=f"http://127.0.0.1:{self.dashboard_port}",
            client_address=f"ray://127.0.0.1:{self.client_port}",
            ray_node_id="f" * 8,
            node_ip="127.0.0.2",
        )

    async def _start_servers(self) -> tuple[int, int]:
        dash = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        client = await asyncio.start_server(self._echo_only, "127.0.0.1", 0)
        self._servers = [dash, client]
        return (
            int(dash.sockets[0].getsockname()[1]),
            int(client.sockets[0].getsockname()[1]),
        )

    async def _echo_only(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._echo(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_server_conns += 1
        try:
            line = (await reader.readline()).decode().split()
            mode = line[0] if line else ""
            if mode == "echo":
                await self._echo(reader, writer)
            elif mode == "hello":
                writer.write(b"hello")
                await writer.drain()
                writer.close()
            elif mode == "flood":
                await self._flood(int(line[1]), writer)
            elif mode == "sink":
                await self._sink(reader, writer)
            else:
                writer.close()
        except (OSError, ConnectionError):
            writer.transport.abort()
        finally:
            self.open_server_conns -= 1

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    async def _flood(self, n: int, writer: asyncio.StreamWriter) -> None:
        data = pattern(n)
        step = 256 * 1024
        for offset in range(0, n, step):
            writer.write(data[offset : offset + step])
            await writer.drain()
            self.flood_written = min(n, offset + step)
        writer.close()

    async def _sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.to_thread(self.sink_go.wait)
        digest = hashlib.sha256()
        total = 0
        while data := await reader.read(1 << 20):
            digest.update(data)
            total += len(data)
        self.sink_received.append((total, digest.hexdigest()))
        writer.close()
