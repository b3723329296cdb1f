"""The tunnel relay at the protocol level: a real coordinator, a real agent (no Ray) whose
"head" ports are test servers, and the real client forwarder.

Multiplexing, back-pressure both ways with bounded buffers, clean close from either side,
refusals (non-owner, unsigned, bad target, ports the agent does not serve), bad frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from loom.agent.tunnel import AgentTunnel
from loom.client.forward import background_forward, open_tunnel, tunnel_request
from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator import tunnel as relay
from loom.protocol.identity import KeyPair, sign_request
from loom.protocol.messages import CLOSE_BAD_MESSAGE
from loom.protocol.tunnel import (
    INITIAL_WINDOW,
    Kind,
    data_frame,
    decode,
    open_frame,
)
from support.fakeagent import force_available
from support.rawagent import auth_message, open_raw
from support.servers import CoordinatorThread, wait_for
from support.tunnelhead import TunnelHead, pattern


@pytest.fixture
def head(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> Iterator[TunnelHead]:
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    h = TunnelHead(coordinator.url, tmp_path / "agent")
    try:
        wait_for(lambda: coordinator.state.hub.is_connected(h.node_id), 20, "the agent")
        coordinator.run_coro(force_available(coordinator.state.sessions, [h.node_id]))
        client.create_cluster({"name": "t", "nodes": 1, "resources": {"cpus": 1}})
        cluster = client.wait_cluster("t", timeout=30)
        assert cluster.state == "running", cluster.reason
        yield h
    finally:
        h.close()


@pytest.fixture
def port(coordinator: CoordinatorThread, user_key: KeyPair, head: TunnelHead) -> Iterator[int]:
    with background_forward(coordinator.url, user_key, "t", "dashboard") as p:
        yield p


def relay_streams(coordinator: CoordinatorThread, head: TunnelHead) -> dict[int, relay.RelayStream]:
    async def get() -> dict[int, relay.RelayStream]:
        conn = coordinator.state.hub.connections[head.node_id]
        return dict(relay.link_for(conn).streams)

    result: dict[int, relay.RelayStream] = coordinator.run_coro(get())
    return result


def dial(port: int, first_line: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(first_line.encode() + b"\n")
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def test_many_streams_multiplexed_on_one_agent_socket(
    port: int, head: TunnelHead, coordinator: CoordinatorThread
) -> None:
    def one(i: int) -> bool:
        payload = os.urandom(300_000 + i * 7919)
        sock = dial(port, "echo")

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = read_all(sock)  # EOF arrives only after the echo server half-closed back
        sender.join()
        sock.close()
        return got == payload

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(12)))
    wait_for(lambda: head.streams() == 0 and not relay_streams(coordinator, head), 10, "cleanup")


def test_client_port_is_reachable_too(
    coordinator: CoordinatorThread, user_key: KeyPair, head: TunnelHead
) -> None:
    with background_forward(coordinator.url, user_key, "t", "client") as p:
        sock = socket.create_connection(("127.0.0.1", p), timeout=30)
        sock.sendall(b"grpc-ish bytes")
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"grpc-ish bytes"
        sock.close()


def test_far_side_closes_first_and_user_sees_eof(
    port: int, head: TunnelHead, coordinator: CoordinatorThread
) -> None:
    sock = dial(port, "hello")
    assert read_all(sock) == b"hello"  # then EOF
    sock.close()
    wait_for(lambda: head.streams() == 0 and not relay_streams(coordinator, head), 10, "cleanup")
    assert head.open_server_conns == 0


def test_user_reset_tears_the_stream_down(
    port: int, head: TunnelHead, coordinator: CoordinatorThread
) -> None:
    sock = dial(port, "sink")
    wait_for(lambda: head.streams() == 1, 10, "the stream on the agent")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST
    wait_for(lambda: head.streams() == 0 and not relay_streams(coordinator, head), 10, "cleanup")
    head.sink_go.set()
    wait_for(lambda: head.open_server_conns == 0, 10, "the head's socket closed")


def test_slow_user_reader_blocks_the_head_and_bounds_relay_memory(
    port: int, head: TunnelHead, coordinator: CoordinatorThread
) -> None:
    total = 160 << 20
    sock = dial(port, f"flood {total}")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    wait_for(lambda: head.flood_written > 0, 10, "the flood to start")
    time.sleep(2.0)  # nobody reads: everything upstream must stall
    stalled_at = head.flood_written
    time.sleep(1.0)
    assert head.flood_written == stalled_at, "the head kept writing into a stalled tunnel"
    assert stalled_at < total // 2, f"{stalled_at} bytes accepted with no reader"
    (stream,) = relay_streams(coordinator, head).values()
    items: list[object] = list(stream.inbox._queue)  # type: ignore[attr-defined]
    queued = sum(len(i) for i in items if isinstance(i, bytes))
    assert queued <= INITIAL_WINDOW and stream.recv_window.held <= INITIAL_WINDOW
    print(f"\nstalled with {stalled_at / 2**20:.1f} MiB written, relay holds {queued} bytes")
    digest = hashlib.sha256()
    n = 0
    while data := sock.recv(1 << 20):
        digest.update(data)
        n += len(data)
    sock.close()
    assert n == total and digest.hexdigest() == hashlib.sha256(pattern(total)).hexdigest()


def test_slow_head_reader_blocks_the_user_sender(
    port: int, head: TunnelHead, coordinator: CoordinatorThread
) -> None:
    total = 160 << 20
    payload = pattern(total)
    sent = 0
    sock = dial(port, "sink")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

    def send() -> None:
        nonlocal sent
        view = memoryview(payload)
        while sent < total:
            sent += sock.send(view[sent : sent + (1 << 20)])
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # The sender must come to a halt well before the end (kernel buffers fill, then the
    # relay's credit window runs out). On a loaded machine the last buffers fill slowly,
    # so wait for a full second without progress rather than for a fixed time.
    stalled_at = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        before = sent
        time.sleep(1.0)
        if sent == before:
            stalled_at = sent
            break
    assert 0 <= stalled_at < total // 2, (sent, stalled_at)
    (stream,) = relay_streams(coordinator, head).values()
    assert stream.send_window.credit <= INITIAL_WINDOW
    head.sink_go.set()
    sender.join(60)
    assert sent == total
    wait_for(lambda: head.sink_received, 60, "the sink to finish")
    sock.close()
    assert head.sink_received == [(total, hashlib.sha256(payload).hexdigest())]


def test_only_the_owner_may_open_a_tunnel(
    coordinator: CoordinatorThread, head: TunnelHead, user_key: KeyPair
) -> None:
    async def attempt(key: KeyPair, ref: str = "t", target: str = "dashboard") -> int:
        try:
            ws = await open_tunnel(coordinator.url, key, ref, target)
        except LoomAPIError as exc:
            return exc.status
        await ws.close()
        return 101

    assert asyncio.run(attempt(user_key)) == 101
    assert asyncio.run(attempt(KeyPair.generate())) == 404  # a stranger cannot even see it
    assert asyncio.run(attempt(user_key, ref="nope")) == 404

    async def unsigned() -> int:
        url, _path, _query = tunnel_request(coordinator.url, "t", "dashboard")
        with pytest.raises(InvalidStatus) as info:
            await connect(url)
        return info.value.response.status_code

    assert asyncio.run(unsigned()) == 401

    async def bad_target() -> int:
        url, path, _query = tunnel_request(coordinator.url, "t", "dashboard")
        query = "port=ssh"
        headers = sign_request(user_key, "GET", path, query, b"", timestamp=int(time.time()))
        with pytest.raises(InvalidStatus) as info:
            await connect(url.replace("port=dashboard", query), additional_headers=headers)
        return info.value.response.status_code

    assert asyncio.run(bad_target()) == 400


def test_agent_refuses_ports_it_does_not_serve(
    coordinator: CoordinatorThread, head: TunnelHead, user_key: KeyPair
) -> None:
    head.allowed.clear()  # as if the head member were gone on the agent
    with pytest.raises(LoomAPIError) as info:
        asyncio.run(open_tunnel(coordinator.url, user_key, "t", "dashboard"))
    assert info.value.status == 502 and "not a Ray port" in info.value.message


async def test_agent_tunnel_unit_refusals_and_window_violation() -> None:
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    tunnel = AgentTunnel(send, lambda: set())
    await tunnel.on_frame(open_frame(1, "127.0.0.1", 22))
    await asyncio.sleep(0.05)
    (refusal,) = [decode(f) for f in sent]
    assert refusal.kind == Kind.CLOSE and b"not a Ray port" in refusal.payload
    await tunnel.on_frame(b"\x01")  # garbage from the coordinator is ignored, not fatal
    await tunnel.on_frame(data_frame(9, b"x"))  # unknown stream: ignored
    assert tunnel.streams == {}


async def test_garbage_binary_frames_close_the_agent_socket(
    coordinator: CoordinatorThread,
) -> None:
    for garbage in (b"\x03\x00", b"\x09\x00\x00\x00\x01", open_frame(5, "127.0.0.1", 1)):
        ws, hello = await open_raw(coordinator.url)
        await ws.send(
            json.dumps(auth_message(hello["nonce"], KeyPair.generate(), KeyPair.generate()))
        )
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(garbage)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == CLOSE_BAD_MESSAGE
        assert "bad tunnel frame" in info.value.rcvd.reason


async def test_user_text_frames_other_than_eof_are_refused(
    coordinator: CoordinatorThread, head: TunnelHead, user_key: KeyPair
) -> None:
    ws = await open_tunnel(coordinator.url, user_key, "t", "dashboard")
    await ws.send(b"echo\n")
    await ws.send('{"type": "rm -rf"}')
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == CLOSE_BAD_MESSAGE
