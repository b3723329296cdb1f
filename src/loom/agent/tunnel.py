"""The agent's end of the tunnel: streams from the coordinator to ports on this machine.

The coordinator sends OPEN {host, port}; the agent connects only if (host, port) is a Ray
port of one of its own running head members (`allowed()`), answers OPENED or CLOSE with
a reason, and then copies bytes both ways under the flow control of `loom.protocol.tunnel`.
A lost WebSocket ends every stream (the coordinator forgets them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loom.protocol.tunnel import (
    MAX_DATA,
    Frame,
    Kind,
    ReceiveWindow,
    SendWindow,
    StreamClosed,
    TunnelProtocolError,
    close_frame,
    data_frame,
    decode,
    eof_frame,
    opened_frame,
    parse_open,
    window_frame,
    window_increment,
)

log = logging.getLogger(__name__)

SendFn = Callable[[bytes], Awaitable[None]]
AllowedFn = Callable[[], set[tuple[str, int]]]

CONNECT_TIMEOUT_S = 10.0
#: Streams one agent serves at once (a cap on sockets and tasks a coordinator can cause).
MAX_STREAMS = 256

_EOF = object()


@dataclass(eq=False)
class _Stream:
    id: int
    writer: asyncio.StreamWriter | None = None
    send_window: SendWindow = field(default_factory=SendWindow)
    recv_window: ReceiveWindow = field(default_factory=ReceiveWindow)
    inbox: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    sent_eof: bool = False
    got_eof: bool = False
    closed: bool = False


class AgentTunnel:
    def __init__(self, send: SendFn, allowed: AllowedFn) -> None:
        self.send = send
        self.allowed = allowed
        self.streams: dict[int, _Stream] = {}

    async def on_frame(self, data: bytes) -> None:
        """Handle one binary frame from the coordinator; never blocks on a stream."""
        try:
            frame = decode(data)
        except TunnelProtocolError as exc:
            log.warning("ignoring a tunnel frame I cannot read: %s", exc)
            return
        stream = self.streams.get(frame.stream)
        if frame.kind == Kind.OPEN:
            if stream is None:
                self._open(frame)
            return
        if stream is None:
            return  # raced a close
        if frame.kind == Kind.DATA:
            try:
                stream.recv_window.receive(len(frame.payload))
            except TunnelProtocolError as exc:
                await self._end(stream, str(exc), tell_peer=True)
                return
            stream.inbox.put_nowait(frame.payload)
        elif frame.kind == Kind.WINDOW:
            stream.send_window.grant(window_increment(frame))
        elif frame.kind == Kind.EOF:
            stream.inbox.put_nowait(_EOF)
        elif frame.kind == Kind.CLOSE:
            reason = frame.payload.decode(errors="replace") or "closed by the coordinator"
            await self._end(stream, reason, tell_peer=False)

    async def reset(self) -> None:
        """The WebSocket is gone: end every stream."""
        for stream in list(self.streams.values()):
            await self._end(stream, "coordinator connection lost", tell_peer=False)

    # -- one stream ------------------------------------------------------------------------

    def _open(self, frame: Frame) -> None:
        stream = _Stream(frame.stream)
        self.streams[stream.id] = stream
        task = asyncio.create_task(self._connect(stream, *parse_open(frame.payload)))
        stream.tasks.append(task)

    async def _connect(self, stream: _Stream, host: str, port: int) -> None:
        if len(self.streams) > MAX_STREAMS:
            await self._end(stream, f"too many tunnel streams (at most {MAX_STREAMS})", True)
            return
        if (host, port) not in self.allowed():
            await self._end(stream, f"{host}:{port} is not a Ray port of a head here", True)
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            await self._end(stream, f"cannot connect to {host}:{port}: {exc}", True)
            return
        if stream.closed:
            writer.close()
            return
        stream.writer = writer
        try:
            await self.send(opened_frame(stream.id))
        except Exception as exc:
            await self._end(stream, f"cannot answer: {exc}", False)
            return
        stream.tasks.append(asyncio.create_task(self._upstream(stream, reader)))
        stream.tasks.append(asyncio.create_task(self._downstream(stream, writer)))

    async def _upstream(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        """Local socket → coordinator, spending credit."""
        try:
            while True:
                n = await stream.send_window.take(MAX_DATA)
                data = await reader.read(n)
                stream.send_window.give_back(n - len(data))
                if not data:
                    break
                await self.send(data_frame(stream.id, data))
            stream.sent_eof = True
            await self.send(eof_frame(stream.id))
            if stream.got_eof:
                await self._end(stream, "", tell_peer=False)
        except StreamClosed:
            pass
        except (OSError, ConnectionError) as exc:
            await self._end(stream, f"read failed: {exc}", tell_peer=True)
        except Exception as exc:  # the WebSocket went away
            await self._end(stream, f"{type(exc).__name__}: {exc}", tell_peer=False)

    async def _downstream(self, stream: _Stream, writer: asyncio.StreamWriter) -> None:
        """Coordinator → local socket, granting credit back as bytes leave."""
        try:
            while True:
                item = await stream.inbox.get()
                if item is _EOF:
                    break
                assert isinstance(item, bytes)
                writer.write(item)
                await writer.drain()
                stream.recv_window.release(len(item))
                await self.send(window_frame(stream.id, len(item)))
            stream.got_eof = True
            if writer.can_write_eof():
                writer.write_eof()
            if stream.sent_eof:
                await self._end(stream, "", tell_peer=False)
        except (OSError, ConnectionError) as exc:
            await self._end(stream, f"write failed: {exc}", tell_peer=True)
        except Exception as exc:
            await self._end(stream, f"{type(exc).__name__}: {exc}", tell_peer=False)

    async def _end(self, stream: _Stream, reason: str, tell_peer: bool) -> None:
        if stream.closed:
            return
        stream.closed = True
        self.streams.pop(stream.id, None)
        stream.send_window.close(reason or "closed")
        if tell_peer:
            with contextlib.suppress(Exception):
                await self.send(close_frame(stream.id, reason))
        if stream.writer is not None:
            if reason:
                stream.writer.transport.abort()
            else:
                stream.writer.close()
        current = asyncio.current_task()
        for task in stream.tasks:
            if task is not current:
                task.cancel()
        if reason:
            log.info("tunnel stream %d ended: %s", stream.id, reason)
