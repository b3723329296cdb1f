"""Hand-signed HTTP requests: what an attacker with a valid key can send (tests/security)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from loom.protocol import identity
from loom.protocol.identity import KeyPair


def signed(
    key: KeyPair,
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    *,
    key_header: str | None = None,
    signed_query: str | None = None,
) -> dict[str, str]:
    """Headers for a request signed over `signed_query` (default: the query sent)."""
    headers = identity.sign_request(
        key,
        method,
        path,
        query if signed_query is None else signed_query,
        body,
        timestamp=int(time.time()),
    )
    if key_header is not None:
        headers[identity.HEADER_KEY] = key_header
    if body:
        headers["content-type"] = "application/json"
    return headers


def send(
    url: str, key: KeyPair, method: str, path: str, query: str = "", **kw: Any
) -> httpx.Response:
    body = kw.pop("body", b"")
    headers = signed(key, method, path, query, body, **kw)
    target = f"{url}{path}" + (f"?{query}" if query else "")
    return httpx.request(method, target, headers=headers, content=body, timeout=10)


def error(response: httpx.Response) -> dict[str, Any]:
    detail: dict[str, Any] = response.json()["error"]
    return detail
