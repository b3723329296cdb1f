"""Tunnel frames: TCP streams multiplexed over the agent WebSocket (the data plane).

A user reaches a port on a cluster's head through ``user ⇄ coordinator ⇄ head agent ⇄
TCP``. Between coordinator and agent, each TCP connection is a *stream* carried in
**binary** WebSocket frames (JSON text frames stay the control plane)::

    byte 0      kind (see `Kind`)
    bytes 1-4   stream id, unsigned 32-bit big-endian (chosen by the coordinator, > 0)
    bytes 5-    payload, by kind:
      OPEN    JSON {"host": str, "port": int}      coordinator → agent
      OPENED  empty                                agent → coordinator
      DATA    1 .. MAX_DATA bytes of the stream     both ways
      WINDOW  unsigned 32-bit increment of credit   both ways
      EOF     empty: the sender will send no more DATA (half-close)
      CLOSE   UTF-8 reason: the stream is aborted, both directions, data in flight dropped

Flow control: each direction of a stream starts with `INITIAL_WINDOW` bytes of credit.
A DATA frame spends credit; the receiver grants it back with WINDOW once the bytes have
left it (written to its socket, or sent on to the user). A peer that sends more than its
credit breaks the protocol and its stream is closed. So no side ever buffers more than
`INITIAL_WINDOW` bytes per stream, however slow the reader at the far end is.

A stream ends normally when each side has both sent and received EOF (no CLOSE needed;
each side forgets it then), or abnormally when either sends CLOSE. Frames for a stream id
that is not (or no longer) open are ignored: they can race a CLOSE. A frame that cannot
be parsed is a protocol error (the coordinator closes the agent's socket with 4003).

The user's side (one WebSocket per TCP connection, ``GET /v1/clusters/{ref}/tunnel``)
needs no stream ids: binary frames are the stream's bytes, and the text frame
``{"type": "eof"}`` is a half-close; closing the WebSocket ends the stream.
"""

from __future__ import annotations

import asyncio
import enum
import json
import struct
from dataclasses import dataclass

#: Credit each direction of a stream starts with (bytes).
INITIAL_WINDOW = 256 * 1024
#: Largest DATA payload.
MAX_DATA = 64 * 1024
#: The text frame that half-closes the user's side of a tunnel.
EOF_TEXT = '{"type": "eof"}'
#: WebSocket close code on the user's side when the stream was aborted (reason says why).
CLOSE_STREAM_RESET = 4010
#: What a user may ask a tunnel for: the head's Ray Jobs API/dashboard, or its client port.
TARGETS = ("dashboard", "client")

_HEADER = struct.Struct(">BI")
_U32 = struct.Struct(">I")


class Kind(enum.IntEnum):
    OPEN = 1
    OPENED = 2
    DATA = 3
    WINDOW = 4
    EOF = 5
    CLOSE = 6


class TunnelProtocolError(ValueError):
    """A frame that breaks the tunnel protocol; the message says how."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    stream: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return _HEADER.pack(self.kind, self.stream) + self.payload


def decode(data: bytes) -> Frame:
    """Parse and check one binary frame (raises TunnelProtocolError)."""
    if len(data) < _HEADER.size:
        raise TunnelProtocolError(f"tunnel frame of {len(data)} bytes is shorter than its header")
    kind_byte, stream = _HEADER.unpack_from(data)
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise TunnelProtocolError(f"unknown tunnel frame kind {kind_byte}") from None
    if stream == 0:
        raise TunnelProtocolError("tunnel stream id 0 is reserved")
    payload = bytes(data[_HEADER.size :])
    if kind == Kind.DATA and not 0 < len(payload) <= MAX_DATA:
        raise TunnelProtocolError(f"DATA frame carries {len(payload)} bytes (1..{MAX_DATA})")
    if kind == Kind.WINDOW and len(payload) != _U32.size:
        raise TunnelProtocolError("WINDOW frame payload must be 4 bytes")
    if kind in (Kind.OPENED, Kind.EOF) and payload:
        raise TunnelProtocolError(f"{kind.name} frame must have no payload")
    if kind == Kind.OPEN:
        parse_open(payload)
    return Frame(kind, stream, payload)


def is_eof_text(text: str | None) -> bool:
    """Whether a user-side text frame is the half-close `{"type": "eof"}`."""
    if text is None or len(text) > 64:
        return False
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == "eof"


def open_frame(stream: int, host: str, port: int) -> bytes:
    body = json.dumps({"host": host, "port": port}).encode()
    return Frame(Kind.OPEN, stream, body).encode()


def parse_open(payload: bytes) -> tuple[str, int]:
    try:
        body = json.loads(payload)
    except ValueError:
        raise TunnelProtocolError("OPEN payload is not JSON") from None
    if not isinstance(body, dict):
        raise TunnelProtocolError("OPEN payload must be a JSON object")
    host, port = body.get("host"), body.get("port")
    if not isinstance(host, str) or not host or len(host) > 255:
        raise TunnelProtocolError("OPEN needs a host")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise TunnelProtocolError("OPEN needs a port in 1..65535")
    return host, port


def window_frame(stream: int, increment: int) -> bytes:
    return Frame(Kind.WINDOW, stream, _U32.pack(increment)).encode()


def window_increment(frame: Frame) -> int:
    return int(_U32.unpack(frame.payload)[0])


def data_frame(stream: int, data: bytes) -> bytes:
    return Frame(Kind.DATA, stream, data).encode()


def eof_frame(stream: int) -> bytes:
    return Frame(Kind.EOF, stream).encode()


def opened_frame(stream: int) -> bytes:
    return Frame(Kind.OPENED, stream).encode()


def close_frame(stream: int, reason: str = "") -> bytes:
    return Frame(Kind.CLOSE, stream, reason.encode()[:200]).encode()


class StreamClosed(Exception):
    """The stream ended while waiting on it; the message says why."""


class SendWindow:
    """Credit to send DATA on one direction of a stream (one sender task at a time)."""

    def __init__(self, initial: int = INITIAL_WINDOW) -> None:
        self.credit = initial
        self._changed = asyncio.Event()
        self._closed: str | None = None

    async def take(self, wanted: int) -> int:
        """Wait for credit, then spend up to `wanted` bytes of it; returns how many."""
        while self.credit <= 0:
            if self._closed is not None:
                raise StreamClosed(self._closed)
            self._changed.clear()
            await self._changed.wait()
        if self._closed is not None:
            raise StreamClosed(self._closed)
        n = min(self.credit, wanted)
        self.credit -= n
        return n

    def give_back(self, n: int) -> None:
        """Return credit taken but not used (a short read)."""
        self.credit += n

    def grant(self, n: int) -> None:
        self.credit += n
        self._changed.set()

    def close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        self._changed.set()


class ReceiveWindow:
    """Accounting for one receiving direction: bytes held but not yet granted back."""

    def __init__(self, window: int = INITIAL_WINDOW) -> None:
        self.window = window
        self.held = 0

    def receive(self, n: int) -> None:
        """Count `n` bytes in; raises TunnelProtocolError if the peer overran its credit."""
        if self.held + n > self.window:
            raise TunnelProtocolError(
                f"peer sent {self.held + n} bytes on a {self.window}-byte window"
            )
        self.held += n

    def release(self, n: int) -> None:
        self.held -= n
