"""Pseudonyms in the public ledger: the chain shows the network, not the people (issue 14 §4).

The hash chain is public (anyone re-verifies it with `loom ledger verify`), so what it
holds is public too. Private account names never enter it:

* ``user:<public key>`` appears as ``user:<64 random hex>`` and ``escrow:<cluster id>`` as
  ``escrow:e<24 random hex>``: random aliases, drawn the first time money moves and kept in
  `ledger_aliases` (never served by a public route). Without that table nobody can tell
  which key or which cluster an alias stands for; the owner sees their own movements
  through signed routes only. An alias is as valid an account name as the real one, so
  every rule and re-verification of the chain works unchanged.
* idempotency keys (which embed the caller's key and any key the client typed) enter the
  chain as ``k:`` + HMAC-SHA256 under a random secret kept in the same table.
* meta values are fixed words chosen by the coordinator (no cluster names, no memos a
  user typed).

Accounts that held money before this existed map to themselves (migration 0007): a hash
chain cannot be rewritten, so their history stays as public as it was.

Every function takes the caller's session; ``create`` is only ever true under the ledger
lock (inside `ledger.post`), so two posts cannot draw two aliases for one account.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import LedgerAlias

SECRET_ROW = "secret:keys"
_PRIVATE = ("user:", "escrow:")


def is_private(account: str) -> bool:
    return account.startswith(_PRIVATE)


def _fresh_alias(account: str) -> str:
    if account.startswith("user:"):
        return "user:" + secrets.token_hex(32)
    return "escrow:e" + secrets.token_hex(12)


async def public_names(
    session: AsyncSession, accounts: Iterable[str], *, create: bool = False
) -> dict[str, str]:
    """``{account: the name it has in the chain}``; unknown private accounts get an alias
    only with ``create`` (otherwise they map to themselves: nothing was ever posted)."""
    names = list(dict.fromkeys(accounts))
    out = {a: a for a in names}
    private = [a for a in names if is_private(a)]
    if not private:
        return out
    rows = await session.execute(
        select(LedgerAlias.account, LedgerAlias.alias).where(LedgerAlias.account.in_(private))
    )
    found = {str(a): str(b) for a, b in rows}
    missing = [a for a in private if a not in found]
    if missing and create:
        new = {a: _fresh_alias(a) for a in missing}
        await session.execute(
            insert(LedgerAlias), [{"account": a, "alias": b} for a, b in new.items()]
        )
        found.update(new)
    out.update(found)
    return out


async def private_names(session: AsyncSession, aliases: Iterable[str]) -> dict[str, str]:
    """The inverse of `public_names` for the aliases given (others map to themselves)."""
    names = list(dict.fromkeys(aliases))
    out = {a: a for a in names}
    private = [a for a in names if is_private(a)]
    if private:
        rows = await session.execute(
            select(LedgerAlias.alias, LedgerAlias.account).where(LedgerAlias.alias.in_(private))
        )
        out.update({str(a): str(b) for a, b in rows})
    return out


async def _secret(session: AsyncSession, *, create: bool) -> str | None:
    value = await session.scalar(select(LedgerAlias.alias).where(LedgerAlias.account == SECRET_ROW))
    if value is None and create:
        value = secrets.token_hex(32)
        await session.execute(insert(LedgerAlias).values(account=SECRET_ROW, alias=value))
    return None if value is None else str(value)


def hashed_key(secret: str, key: str) -> str:
    return "k:" + hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()[:48]


async def public_key(session: AsyncSession, key: str, *, create: bool = False) -> str:
    """The idempotency key as the chain holds it (``key`` itself before any secret exists)."""
    secret = await _secret(session, create=create)
    return key if secret is None else hashed_key(secret, key)
