"""What clusters cost, read from the ledger: escrow held, settled to suppliers, refunded.

The user's own history gives each cluster's hold and refund; the public ledger's settle
transactions (meta `cluster`) give what was taken from escrow, what suppliers got and the
platform fee. Settlement runs at least every 60 s, so a running cluster's "spent" lags its
metering by up to a minute; after `down` the figures are final.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.client.sdk import LoomClient
from loom.core.money import AmountError, format_credits, parse_credits

HISTORY_LIMIT = 1000
LEDGER_PAGE = 1000
MAX_LEDGER_PAGES = 20  # a bounded scan: on a very busy network older settlements are skipped


@dataclass
class ClusterMoney:
    escrowed_micro: int = 0  # held at `cluster up`
    spent_micro: int = 0  # settled out of escrow (suppliers + fee)
    suppliers_micro: int = 0
    fee_micro: int = 0
    refunded_micro: int = 0
    first_seq: int = 0

    @property
    def escrow_left_micro(self) -> int:
        return max(0, self.escrowed_micro - self.spent_micro - self.refunded_micro)

    def as_json(self) -> dict[str, str]:
        return {
            "escrowed": format_credits(self.escrowed_micro),
            "spent": format_credits(self.spent_micro),
            "suppliers_earned": format_credits(self.suppliers_micro),
            "platform_fee": format_credits(self.fee_micro),
            "refunded": format_credits(self.refunded_micro),
            "escrow_left": format_credits(self.escrow_left_micro),
        }


def _micro(text: str) -> int:
    try:
        return parse_credits(text.lstrip("-"), allow_zero=True)
    except AmountError:
        return 0


def cluster_money(client: LoomClient, cluster_ids: list[str]) -> dict[str, ClusterMoney]:
    """Money per cluster id (clusters with no ledger movement get zeros)."""
    out = {cid: ClusterMoney() for cid in cluster_ids}
    if not out:
        return out
    for item in client.history(limit=HISTORY_LIMIT):
        money = out.get(item.cluster)
        if money is None or item.account != "user":
            continue
        if item.kind == "hold":
            money.escrowed_micro += _micro(item.amount)
        elif item.kind == "refund":
            money.refunded_micro += _micro(item.amount)
        money.first_seq = min(money.first_seq or item.seq, item.seq)
    seqs = [m.first_seq for m in out.values() if m.first_seq]
    if not seqs:
        return out
    after = min(seqs) - 1
    for _ in range(MAX_LEDGER_PAGES):
        page = client.ledger_transactions(after=after, limit=LEDGER_PAGE)
        for txn in page:
            money = out.get(txn.meta.get("cluster", ""))
            if money is None or txn.kind != "settle":
                continue
            for entry in txn.entries:
                amount = int(entry.amount_micro)
                if entry.account.startswith("escrow:"):
                    money.spent_micro += -amount
                elif entry.account.startswith("earnings:"):
                    money.suppliers_micro += amount
                elif entry.account == "system:fees":
                    money.fee_micro += amount
        if len(page) < LEDGER_PAGE:
            break
        after = page[-1].seq
    return out
