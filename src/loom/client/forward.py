"""Local ports that reach a cluster head's Ray ports through the coordinator.

Every TCP connection accepted on a local port becomes one signed WebSocket to
``GET /v1/clusters/{ref}/tunnel?port=dashboard|client`` (see `loom.protocol.tunnel`):
binary frames carry the bytes, ``{"type": "eof"}`` half-closes, and the WebSocket's close
ends the connection (a close code other than 1000 resets the local socket).

    async with Forwarder(url, key, "demo", "dashboard", port=8265) as fwd:
        ...  # http://127.0.0.1:8265 is the head's Ray dashboard and Jobs API

`background_forward` runs one on its own thread for synchronous code (the job commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from loom.client.sdk import LoomAPIError, LoomConnectionError, LoomError
from loom.protocol.identity import KeyPair, sign_request
from loom.protocol.messages import MAX_FRAME_BYTES
from loom.protocol.tunnel import EOF_TEXT, MAX_DATA, TARGETS, is_eof_text

log = logging.getLogger(__name__)

ErrorFn = Callable[[str], None]


def tunnel_request(base_url: str, ref: str, target: str) -> tuple[str, str, str]:
    """(ws URL, path, query) of the tunnel endpoint for `ref`'s `target` port."""
    parts = urlsplit(base_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise LoomError(f"coordinator URL must be http(s)://HOST:PORT, got {base_url!r}")
    path = f"{parts.path}/v1/clusters/{quote(ref, safe='')}/tunnel"
    query = urlencode({"port": target})
    return urlunsplit((scheme, parts.netloc, path, query, "")), path, query


async def open_tunnel(base_url: str, key: KeyPair, ref: str, target: str) -> ClientConnection:
    """A signed tunnel WebSocket, or LoomAPIError with the coordinator's reason."""
    if target not in TARGETS:
        raise LoomError(f"tunnel target must be one of {', '.join(TARGETS)}")
    url, path, query = tunnel_request(base_url, ref, target)
    headers = sign_request(key, "GET", path, query, b"", timestamp=int(time.time()))
    try:
        return await connect(
            url,
            additional_headers=headers,
            max_size=MAX_FRAME_BYTES,
            compression=None,
            open_timeout=30,
            ping_interval=20,
            ping_timeout=60,
        )
    except InvalidStatus as exc:
        raise _refusal(exc) from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise LoomConnectionError(
            f"cannot reach the coordinator at {base_url} ({type(exc).__name__})"
        ) from None


def _refusal(exc: InvalidStatus) -> LoomAPIError:
    status = exc.response.status_code
    try:
        error = json.loads(exc.response.body or b"")["error"]
        return LoomAPIError(status, str(error["code"]), str(error["message"]), error.get("field"))
    except (ValueError, KeyError, TypeError):
        return LoomAPIError(status, "http_error", f"tunnel refused with HTTP {status}")


async def pump(
    ws: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Copy bytes between a local socket and a tunnel WebSocket until the stream ends."""

    async def up() -> None:
        try:
            while True:
                data = await reader.read(MAX_DATA)
                if not data:
                    await ws.send(EOF_TEXT)
                    return
                await ws.send(data)
        except (OSError, ConnectionError):
            await ws.close(code=1000, reason="local connection reset")

    sender = asyncio.create_task(up())
    clean = False
    try:
        async for message in ws:
            if isinstance(message, bytes):
                writer.write(message)
                await writer.drain()
            elif is_eof_text(message):
                if writer.can_write_eof():
                    writer.write_eof()
            else:
                await ws.close(code=4003, reason="unexpected text frame")
                break
        clean = ws.close_code == 1000
    except ConnectionClosed:
        pass
    except (OSError, ConnectionError):
        await ws.close(code=1000, reason="local connection reset")
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        if clean:
            writer.close()
        else:
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        if not clean and ws.close_code not in (None, 1000):
            log.info("tunnel closed: %s (%s)", ws.close_reason, ws.close_code)


class Forwarder:
    """Listen on a local port; relay every connection to `ref`'s head `target` port."""

    def __init__(
        self,
        base_url: str,
        key: KeyPair,
        ref: str,
        target: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_error: ErrorFn | None = None,
    ) -> None:
        self.base_url = base_url
        self.key = key
        self.ref = ref
        self.target = target
        self.host = host
        self.port = port
        self.on_error = on_error or (lambda message: log.warning("%s", message))
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def check(self) -> None:
        """Open and drop one tunnel: raises LoomAPIError if the coordinator refuses."""
        ws = await open_tunnel(self.base_url, self.key, self.ref, self.target)
        await ws.close()

    async def start(self) -> int:
        """Start listening; returns the local port."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            try:
                ws = await open_tunnel(self.base_url, self.key, self.ref, self.target)
            except LoomError as exc:
                self.on_error(f"tunnel to {self.ref} ({self.target}) refused: {exc}")
                writer.transport.abort()
                return
            try:
                await pump(ws, reader, writer)
            finally:
                await ws.close()
        except asyncio.CancelledError:
            # Closing the forwarder cancels its connections. End quietly: asyncio's
            # client_connected_cb done-callback calls task.exception(), which on a
            # *cancelled* task raises and logs a CancelledError traceback.
            writer.transport.abort()
        finally:
            self._handlers.discard(task)


def _log_quietly(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    log.debug("forward loop: %s (%r)", context.get("message"), context.get("exception"))


@contextlib.contextmanager
def background_forward(
    base_url: str, key: KeyPair, ref: str, target: str = "dashboard", *, check: bool = True
) -> Iterator[int]:
    """Run a Forwarder on an ephemeral local port in a thread; yields the port."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_log_quietly)  # a CLI run never prints asyncio tracebacks
    thread = threading.Thread(target=loop.run_forever, name="loom-forward", daemon=True)
    thread.start()
    forwarder = Forwarder(base_url, key, ref, target)
    try:
        if check:
            asyncio.run_coroutine_threadsafe(forwarder.check(), loop).result(60)
        port = asyncio.run_coroutine_threadsafe(forwarder.start(), loop).result(10)
        yield port
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(forwarder.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
