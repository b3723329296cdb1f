"""What a cluster costs: escrow held, settled to suppliers so far, refunded at the end.

The ledger's public view carries no cluster ids (privacy), so the figures come from the
cluster itself and from the explorer's aggregate view of it (public, by cluster id):

* held in escrow: what `cluster up` held, each member's price × devices × duration,
  rounded up (the coordinator's own rule, `core.metering.escrow_needed`);
* spent: what was settled out of escrow to suppliers (gross); settlement runs at least
  every 60 s, so a running cluster's figure lags by up to a minute, and is final after
  `cluster down`;
* refunded: after the end, what was held and not spent (the ledger returns it);
* suppliers' share: spent minus the platform fee (rounded down per settlement, so the
  fee shown is an upper bound by a few micro-credits).
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.client.sdk import LoomClient, LoomError
from loom.core.metering import escrow_needed
from loom.core.money import AmountError, format_credits, parse_credits
from loom.protocol.api import ClusterOut

ENDED = ("terminated", "failed")


@dataclass
class ClusterMoney:
    escrowed_micro: int = 0
    spent_micro: int = 0
    fee_micro: int = 0
    ended: bool = False

    @property
    def refunded_micro(self) -> int:
        return max(0, self.escrowed_micro - self.spent_micro) if self.ended else 0

    @property
    def escrow_left_micro(self) -> int:
        return 0 if self.ended else max(0, self.escrowed_micro - self.spent_micro)

    @property
    def suppliers_micro(self) -> int:
        return max(0, self.spent_micro - self.fee_micro)

    def as_json(self) -> dict[str, str]:
        return {
            "escrowed": format_credits(self.escrowed_micro),
            "spent": format_credits(self.spent_micro),
            "suppliers_earned": format_credits(self.suppliers_micro),
            "platform_fee": format_credits(self.fee_micro),
            "refunded": format_credits(self.refunded_micro),
            "escrow_left": format_credits(self.escrow_left_micro),
        }


def _micro(text: object) -> int:
    try:
        return parse_credits(str(text), allow_zero=True)
    except AmountError:
        return 0


def escrow_of(cluster: ClusterOut) -> int:
    """What `cluster up` held: the first `nodes` members (replacements are not re-held)."""
    duration = max(0, round(cluster.expires_at - cluster.created_at))
    nodes = cluster.spec.get("nodes")
    members = cluster.members[: nodes if isinstance(nodes, int) else len(cluster.members)]
    return sum(escrow_needed(_micro(m.price), max(1, m.units), duration) for m in members)


def cluster_money(client: LoomClient, clusters: list[ClusterOut]) -> dict[str, ClusterMoney]:
    """Money per cluster id."""
    out: dict[str, ClusterMoney] = {}
    fee_bps: int | None = None
    for cluster in clusters:
        money = ClusterMoney(escrowed_micro=escrow_of(cluster), ended=cluster.state in ENDED)
        try:
            public = client.request("GET", f"/explorer/api/clusters/{cluster.id}").json()
            money.spent_micro = _micro(public.get("settled", "0"))
        except (LoomError, ValueError, AttributeError):
            pass
        if money.spent_micro:
            if fee_bps is None:
                try:
                    fee_bps = client.earnings().fee_bps
                except LoomError:
                    fee_bps = 0
            money.fee_micro = money.spent_micro * fee_bps // 10_000
        out[cluster.id] = money
    return out
