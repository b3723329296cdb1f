"""HTTP API schemas of the money plane: credits, earnings, payouts, ledger, offers, quotes.

Amounts are decimal strings of credits ("12.5"), never floats. Ledger entries also carry
``amount_micro`` as a decimal string of the integer the hash chain covers, so anyone can
re-verify a downloaded chain with `loom.core.ledger_verify.verify_chain`.
"""

from __future__ import annotations

from pydantic import Field

from loom.protocol.api import Response, UserInput

#: The one syntax of an amount on the wire (see `loom.core.money.parse_credits`): ASCII
#: digits, optionally a point and up to 6 more; no sign, exponent, '_' or other digits.
AMOUNT_PATTERN = r"^[0-9]{1,13}(\.[0-9]{1,6})?$"
AMOUNT_MAX_CHARS = 32


class DepositRequest(UserInput):
    amount: str = Field(
        max_length=AMOUNT_MAX_CHARS,
        description="credits as a decimal string, e.g. '50' or '12.5' "
        f"(syntax {AMOUNT_PATTERN}; checked with a message naming the field)",
    )
    idempotency_key: str | None = Field(
        default=None,
        max_length=100,
        description="optional: a retried request with the same key is not minted twice",
    )


class PayoutRequest(UserInput):
    amount: str = Field(
        max_length=AMOUNT_MAX_CHARS,
        description=f"credits to withdraw from your settled earnings (syntax {AMOUNT_PATTERN})",
    )
    idempotency_key: str | None = Field(default=None, max_length=100)


class TxnReceipt(Response):
    seq: int
    kind: str
    amount: str
    hash: str
    replayed: bool = False
    balance: str = Field(default="0", description="the account's balance after it")
    receipt: str = ""


class BalanceOut(Response):
    account: str
    balance: str = Field(description="available credits")
    escrowed: str = Field(description="credits held in the escrow of your clusters")
    earnings: str = Field(default="0", description="settled supplier earnings, withdrawable")


class HistoryItem(Response):
    seq: int
    kind: str
    account: str
    amount: str
    created_at: float
    memo: str = ""
    cluster: str = ""


class EarningLineOut(Response):
    id: str
    name: str = ""
    settled: str = Field(description="gross taken from escrow for you")
    paid: str = Field(description="credited to your earnings (settled minus the platform fee)")
    pending: str = Field(description="accrued or accruing, not settled yet (gross)")


class EarningsOut(Response):
    account: str
    available: str = Field(description="settled earnings you can withdraw")
    paid_out: str = "0"
    fee_bps: int = 0
    nodes: list[EarningLineOut] = Field(default_factory=list)
    clusters: list[EarningLineOut] = Field(default_factory=list)


class LedgerEntryOut(Response):
    account: str
    amount_micro: str
    amount: str


class LedgerTxnOut(Response):
    seq: int
    kind: str
    idempotency_key: str
    created_at: int = Field(description="unix microseconds")
    meta: dict[str, str] = Field(default_factory=dict)
    entries: list[LedgerEntryOut]
    prev_hash: str
    hash: str


class LedgerVerifyOut(Response):
    ok: bool
    count: int
    last_seq: int
    head_hash: str
    minted: str = Field(description="credits ever minted by the faucet")
    total: str = Field(description="sum of every balance, faucet included: must be 0")
    failure: str | None = None


class OfferOut(Response):
    node_id: str
    node_name: str
    gpu: str
    gpus: int
    vram_gb: float
    cpus: int
    ram_gb: float
    region: str
    country: str
    price: str = Field(description="credits per device-hour (cpu: per core-hour)")
    reliability: float
    verified: bool
    security: str
    connectivity: str


class QuoteRequest(UserInput):
    spec: dict[str, object]


class QuoteMemberOut(Response):
    node_id: str
    role: str
    model: str
    units: int
    price: str
    region: str


class CloudPriceOut(Response):
    provider: str
    price: str = Field(description="US dollars per GPU-hour (1 credit = 1 USD)")
    instance: str = ""
    region: str = ""
    as_of: str = ""
    source: str = ""


class QuoteOut(Response):
    model: str
    devices: int
    duration_s: int
    price_per_hour: str
    total: str
    escrow: str = Field(description="what `cluster up` holds from your balance")
    members: list[QuoteMemberOut] = Field(default_factory=list)
    hyperscaler_price_per_hour: str | None = Field(
        default=None, description="the same devices at the hyperscalers' median list price"
    )
    hyperscaler_total: str | None = None
    saving_pct: str | None = Field(default=None, description="vs the hyperscaler median, in %")
    cheapest_cloud: str | None = None
    cheapest_cloud_price: str | None = None
    saving_vs_cheapest_pct: str | None = None
    references: list[CloudPriceOut] = Field(default_factory=list)
