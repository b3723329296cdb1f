"""Signed-request verification and accounts (an unknown key is simply a new account)."""

from __future__ import annotations

import re
import time

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import Account, RequestNonce
from loom.coordinator.errors import BadRequest, Unauthorized
from loom.protocol import identity

_NONCE_RE = re.compile(r"[0-9a-fA-F]{16,128}")


async def verify_request(
    session: AsyncSession,
    *,
    method: str,
    path: str,
    query: str,
    body: bytes,
    headers: dict[str, str],
    max_skew_s: int,
    now: float | None = None,
) -> str:
    """Check a signed request and record its nonce; return the caller's public key.

    Refuses, with 401 and a code saying which: missing headers, a key in any spelling but
    its one canonical form (64 lower-case hex digits), a bad signature, clock skew over
    `max_skew_s`, and a nonce already used by this key. A query naming a parameter twice
    is refused with 400 (the signature covers the query exactly as sent).
    """
    now = time.time() if now is None else now
    key = headers.get(identity.HEADER_KEY)
    ts_text = headers.get(identity.HEADER_TIMESTAMP)
    nonce = headers.get(identity.HEADER_NONCE)
    signature = headers.get(identity.HEADER_SIGNATURE)
    if not (key and ts_text and nonce and signature):
        raise Unauthorized(
            "auth_missing",
            "request is not signed: send X-Loom-Key, X-Loom-Timestamp, X-Loom-Nonce and "
            "X-Loom-Signature (the loom SDK and CLI do this for you)",
        )
    try:
        identity.parse_public_key(key)
    except identity.IdentityError as exc:
        raise Unauthorized("auth_bad_key", f"X-Loom-Key: {exc}") from None
    dupes = identity.duplicate_query_names(query)
    if dupes:
        raise BadRequest(
            "duplicate_query_param",
            f"query parameter {dupes[0]!r} is given more than once; give each parameter once",
            field=dupes[0],
        )
    try:
        if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 12:
            raise ValueError(ts_text)
        timestamp = int(ts_text)
    except ValueError:
        raise Unauthorized("auth_bad_timestamp", "X-Loom-Timestamp must be unix seconds") from None
    if not _NONCE_RE.fullmatch(nonce):
        raise Unauthorized("auth_bad_nonce", "X-Loom-Nonce must be 16 to 128 hex characters")
    message = identity.canonical_request(method, path, query, body, timestamp, nonce)
    if not identity.verify_signature(key, message, signature):
        raise Unauthorized(
            "auth_bad_signature",
            "signature does not match the request (was it changed in transit, or signed "
            "with another key?)",
        )
    skew = abs(now - timestamp)
    if skew > max_skew_s:
        raise Unauthorized(
            "auth_clock_skew",
            f"request timestamp is {skew:.0f} s away from the coordinator's clock "
            f"(at most {max_skew_s} s allowed): fix this machine's clock",
        )
    try:
        async with session.begin_nested():
            session.add(RequestNonce(key=key, nonce=nonce.lower(), expires_at=now + 2 * max_skew_s))
    except IntegrityError:
        raise Unauthorized(
            "auth_replayed_nonce",
            "this request's nonce was already used: requests cannot be replayed",
        ) from None
    await ensure_account(session, key, now)
    return key


async def ensure_account(session: AsyncSession, key: str, now: float) -> Account:
    account = await session.get(Account, key)
    if account is not None:
        return account
    try:
        async with session.begin_nested():
            account = Account(key=key, created_at=now)
            session.add(account)
    except IntegrityError:
        existing = await session.get(Account, key)
        assert existing is not None
        return existing
    return account


async def purge_nonces(session: AsyncSession, now: float) -> int:
    result = await session.execute(delete(RequestNonce).where(RequestNonce.expires_at < now))
    return int(getattr(result, "rowcount", 0) or 0)


async def get_account(session: AsyncSession, key: str) -> Account | None:
    return (await session.execute(select(Account).where(Account.key == key))).scalar_one_or_none()
