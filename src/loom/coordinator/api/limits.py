"""A pure ASGI middleware at the edge of every request, before any route runs:

* a request body over the size limit is refused with 413 (`body_too_large`);
* a query string over `MAX_QUERY_BYTES` is refused with 414 (`query_too_long`);
* a query that names one parameter twice is refused with 400 (`duplicate_query_param`):
  which of the two values a route reads must never be a question (the signature covers
  the query exactly as sent, see `loom.protocol.identity`).

WebSocket upgrades with a bad query are closed before they are accepted (HTTP 403).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.protocol.identity import duplicate_query_names

#: Longest query string accepted (the offer query `q` is at most 4,096 characters).
MAX_QUERY_BYTES = 16_384


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = query_refusal(bytes(scope.get("query_string", b"")))
        if refusal is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": refusal[2][:120]})
            else:
                await _send_error(send, *refusal)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        message = f"request body is larger than {self.max_bytes} bytes"
        await _send_error(send, 413, "body_too_large", message)


def query_refusal(raw: bytes) -> tuple[int, str, str, str | None] | None:
    """(status, code, message, field) when the query string must be refused, else None."""
    if len(raw) > MAX_QUERY_BYTES:
        return 414, "query_too_long", f"query string is longer than {MAX_QUERY_BYTES} bytes", None
    if not raw:
        return None
    dupes = duplicate_query_names(raw.decode("latin-1"))
    if dupes:
        message = f"query parameter {dupes[0]!r} is given more than once; give each parameter once"
        return 400, "duplicate_query_param", message, dupes[0][:64]
    return None


async def _send_error(
    send: Send, status: int, code: str, message: str, field: str | None = None
) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
