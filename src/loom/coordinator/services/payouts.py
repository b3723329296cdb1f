"""Funding and payout adapters: how credit enters and leaves Loom.

The ledger does not know about payment rails. A deposit adapter decides whether credit
may be minted into an account (the embedded default is the operator's faucet); a payout
adapter sends withdrawn earnings somewhere and names its ``payout:<adapter>`` sink. Real
rails (a bank, a chain) are later adapters behind these interfaces. An adapter that talks
to the outside world must be idempotent on ``reference`` — the ledger transaction's
idempotency key — because a retried request reaches it again with the same reference.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.errors import BadRequest, Forbidden, PaymentRequired
from loom.coordinator.services import ledger
from loom.coordinator.services.ledger_sequencer import Sequencer
from loom.core import ledger as core
from loom.core.ledger import Transaction
from loom.core.money import MICRO, format_credits

#: One faucet deposit may mint at most this much (an absurd amount is refused).
FAUCET_MAX_MICRO = 1_000_000 * MICRO
_CLIENT_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


class PayoutAdapter(Protocol):
    #: names the ledger sink ``payout:<name>``
    name: str

    async def send(self, supplier: str, amount_micro: int, reference: str) -> str:
        """Send ``amount_micro`` to the supplier's payout destination; return a receipt."""
        ...


class DepositAdapter(Protocol):
    name: str

    def check(self, account: str, amount_micro: int) -> None:
        """Raise a ServiceError unless ``amount_micro`` may be credited to ``account``."""
        ...


@dataclass
class LedgerPayouts:
    """The embedded adapter: earnings move to ``payout:embedded`` and stop there."""

    name: str = "embedded"

    async def send(self, supplier: str, amount_micro: int, reference: str) -> str:
        return f"embedded:{reference}"


@dataclass
class Faucet:
    """The embedded deposit adapter: the operator's faucet mints on request, if enabled."""

    enabled: bool
    name: str = "faucet"

    def check(self, account: str, amount_micro: int) -> None:
        if not self.enabled:
            raise Forbidden(
                "faucet_disabled",
                "deposits are minted by the faucet, which is off on this coordinator: the "
                "operator must start it with `loom coordinator serve --faucet` (on in `loom up`)",
            )
        if amount_micro > FAUCET_MAX_MICRO:
            raise BadRequest(
                "amount_too_large",
                f"the faucet mints at most {format_credits(FAUCET_MAX_MICRO)} credits at once",
                field="amount",
            )


def client_key(kind: str, caller: str, given: str | None) -> str:
    """An idempotency key scoped to the caller (a random one when none is given)."""
    if given is None:
        return f"{kind}:{caller}:{secrets.token_hex(12)}"
    if not 1 <= len(given) <= 100 or not set(given) <= _CLIENT_KEY_CHARS:
        raise BadRequest(
            "invalid_idempotency_key",
            "idempotency_key: use 1-100 of letters, digits and _ . : -",
            field="idempotency_key",
        )
    return f"{kind}:{caller}:c:{given}"


async def deposit(
    session: AsyncSession,
    adapter: DepositAdapter,
    caller: str,
    amount_micro: int,
    key: str,
    now: float,
    sequencer: Sequencer | None = None,
) -> Transaction:
    """Mint into the caller's balance: through ``sequencer`` (sealed and committed in its
    batch; ``session`` is not written) or, without one, in ``session`` (caller commits)."""
    adapter.check(core.user_account(caller), amount_micro)
    entries = core.deposit_entries(caller, amount_micro)
    meta = {"adapter": adapter.name, "memo": "deposit"}
    if sequencer is not None:
        return await sequencer.post(core.DEPOSIT, key, entries, meta)
    return await ledger.post(session, core.DEPOSIT, key, entries, meta, now)


async def payout(
    session: AsyncSession,
    adapter: PayoutAdapter,
    supplier: str,
    amount_micro: int,
    key: str,
    now: float,
) -> Transaction:
    """Withdraw from the caller's own earnings account (the only account it can name)."""
    await ledger.lock_head(session)
    existing = await ledger.get_by_key(session, key)
    if existing is None:
        have = await ledger.balance(session, core.earnings_account(supplier))
        if have < amount_micro:
            raise PaymentRequired(
                "insufficient_earnings",
                f"your settled earnings are {format_credits(have)} credits; you can withdraw "
                f"at most that (pending earnings settle at least every minute)",
                field="amount",
            )
    receipt = await adapter.send(supplier, amount_micro, key)
    return await ledger.post(
        session,
        core.PAYOUT,
        key,
        core.payout_entries(supplier, adapter.name, amount_micro),
        {"adapter": adapter.name, "memo": "payout", "receipt": receipt[:200]},
        now,
    )
