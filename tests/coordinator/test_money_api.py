"""The money plane through the API: credits, refusals that write nothing, escrow, metering,
earnings, payouts, offers and quotes, and the public ledger."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.config import Settings
from loom.coordinator.loops.settlement import run_settlement
from loom.core.ledger import Entry, Transaction
from loom.core.ledger_verify import verify_chain
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread, free_port, wait_for
from support.vouch import vouch


def _ready(coordinator: CoordinatorThread, fakes: FakeAgents) -> None:
    ids = [n.node_id for n in fakes.nodes]
    coordinator.run_coro(force_available(coordinator.state.sessions, ids))


def _refused(call: object, status: int, code: str) -> LoomAPIError:
    with pytest.raises(LoomAPIError) as info:
        call()  # type: ignore[operator]
    assert (info.value.status, info.value.code) == (status, code), info.value
    return info.value


def test_deposit_replay_history_and_verify(client: LoomClient) -> None:
    first = client.deposit("50", idempotency_key="pay-1")
    assert (first.amount, first.balance, first.replayed) == ("50", "50", False)
    again = client.deposit("50", idempotency_key="pay-1")
    assert again.replayed and again.seq == first.seq and again.balance == "50"
    _refused(lambda: client.deposit("51", idempotency_key="pay-1"), 409, "idempotency_conflict")
    client.deposit("0.000001")
    assert client.balance().model_dump() == {
        "account": client.key.public_hex,
        "balance": "50.000001",
        "escrowed": "0",
        "earnings": "0",
    }
    history = client.history()
    assert [(h.kind, h.amount) for h in history] == [("deposit", "0.000001"), ("deposit", "50")]
    verified = client.ledger_verify()
    assert verified.ok and verified.count == 2 and verified.minted == "50.000001"
    assert verified.total == "0"
    # Anyone can re-verify the downloaded chain offline.
    txns = [
        Transaction(
            t.seq,
            t.kind,
            t.idempotency_key,
            tuple(Entry(e.account, int(e.amount_micro)) for e in t.entries),
            t.meta,
            t.created_at,
            t.prev_hash,
            t.hash,
        )
        for t in client.ledger_transactions()
    ]
    report = verify_chain(txns, expected_head=verified.head_hash)
    assert report.ok and report.count == 2


def test_bad_input_is_refused_and_writes_nothing(client: LoomClient) -> None:
    client.deposit("10")
    before = client.ledger_verify()
    for amount in ("-1", "0", "0.0000001", "1e30", "abc", "NaN", "", "1000001"):
        err = _refused(
            lambda a=amount: client.deposit(a),
            400,
            "amount_too_large" if amount == "1000001" else "invalid_amount",
        )
        assert err.field == "amount"
    _refused(
        lambda: client.deposit("1", idempotency_key="has space"), 400, "invalid_idempotency_key"
    )
    # No request can name an account: deposits credit the caller, payouts debit the
    # caller's own earnings. A body that tries is refused, not ignored.
    for body in (
        {"amount": "1", "account": "user:" + "b" * 64},
        {"amount": "1", "from": "earnings:" + "b" * 64},
    ):
        _refused(
            lambda b=body: client.request("POST", "/v1/payouts", json=b), 400, "invalid_request"
        )
        _refused(
            lambda b=body: client.request("POST", "/v1/credits/deposit", json=b),
            400,
            "invalid_request",
        )
    err = _refused(lambda: client.payout("5"), 402, "insufficient_earnings")
    assert "0 credits" in err.message
    _refused(lambda: client.payout("-5"), 400, "invalid_amount")
    _refused(lambda: client.offers("price<=abc"), 400, "invalid_query")
    _refused(lambda: client.offers("", sort="colour"), 400, "invalid_sort")
    _refused(lambda: client.quote({"nodes": 1, "colour": "red"}), 400, "invalid_spec")
    _refused(lambda: client.create_cluster({"resources": {"cpus": 1}}), 409, "no_capacity")
    after = client.ledger_verify()
    assert (after.count, after.head_hash) == (before.count, before.head_hash)
    assert client.balance().balance == "10"


def test_malformed_query_points_at_the_token(client: LoomClient) -> None:
    err = _refused(lambda: client.offers("gpu=rtx4090 price<=abc"), 400, "invalid_query")
    line, caret = err.message.splitlines()[:2]
    assert line == "gpu=rtx4090 price<=abc"
    assert caret.index("^") == line.index("abc") and "credits" in caret


def test_faucet_off_refuses_deposits(settings: Settings) -> None:
    server = CoordinatorThread(replace(settings, faucet=False, port=free_port())).start()
    try:
        with LoomClient(server.url, KeyPair.generate()) as c:
            err = _refused(lambda: c.deposit("5"), 403, "faucet_disabled")
            assert "--faucet" in err.message
            assert c.ledger_verify().count == 0
    finally:
        server.stop()


def test_concurrent_deposits_over_http(coordinator: CoordinatorThread) -> None:
    keys = [KeyPair.generate() for _ in range(4)]

    def run(key: KeyPair) -> None:
        with LoomClient(coordinator.url, key) as c:
            for i in range(5):
                c.deposit("1", idempotency_key=f"k{i % 3}")  # 2 of 5 are replays

    threads = [threading.Thread(target=run, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with LoomClient(coordinator.url, keys[0]) as c:
        verified = c.ledger_verify()
        assert verified.ok and verified.count == 12 and verified.minted == "12"
        assert c.balance().balance == "3"


def test_offers_and_quote(
    coordinator: CoordinatorThread, client: LoomClient, fakes: FakeAgents
) -> None:
    fakes.add("g1", price="0.40", gpus=["a100-80gb", "a100-80gb"])
    fakes.add("g2", price="0.30", gpus=["a100-80gb"], region="us-east")
    fakes.add("c1", price="0.05")
    _ready(coordinator, fakes)
    offers = client.offers("gpu=a100-80gb price<=0.5")
    assert [(o.node_name, o.gpus, o.price) for o in offers] == [("g2", 1, "0.3"), ("g1", 2, "0.4")]
    assert [o.node_name for o in client.offers("gpu=a100-80gb gpus>=2")] == ["g1"]
    assert [o.node_name for o in client.offers("region in [us] gpu=a100-80gb")] == ["g2"]
    assert client.offers("gpu=a100-80gb price<0.3") == []
    quote = client.quote({"nodes": 2, "resources": {"gpu": "a100-80gb"}, "duration": "2h"})
    assert (quote.model, quote.devices, quote.price_per_hour, quote.total) == (
        "a100-80gb",
        2,
        "0.7",
        "1.4",
    )
    assert quote.escrow == "1.4" and quote.references
    assert quote.saving_pct is not None and float(quote.saving_pct) > 80
    assert quote.hyperscaler_total is not None and float(quote.hyperscaler_total) > 1.4
    _refused(
        lambda: client.quote({"nodes": 5, "resources": {"gpu": "a100-80gb"}}), 409, "no_capacity"
    )
    # `--price auto` follows the median of the model's fixed prices (0.3 and 0.4).
    fakes.add("auto", price="auto", gpus=["a100-80gb"])
    _ready(coordinator, fakes)
    assert coordinator.run_coro(run_settlement(coordinator.state)).prices_changed == 1
    prices = {o.node_name: o.price for o in client.offers("gpu=a100-80gb")}
    assert prices == {"g1": "0.4", "g2": "0.3", "auto": "0.35"}


def test_escrow_metering_settlement_refund_and_payout(
    coordinator: CoordinatorThread, client: LoomClient, fakes: FakeAgents
) -> None:
    supplier = KeyPair.generate()
    fakes.add("s1", price="36", owner=supplier)  # 0.01 credits a second per core
    _ready(coordinator, fakes)
    # Too poor: refused with the shortfall, nothing reserved or written.
    _refused(lambda: client.create_cluster({"resources": {"cpus": 1}}), 402, "insufficient_funds")
    err = _refused(
        lambda: client.create_cluster({"resources": {"cpus": 1}, "duration": "1h"}),
        402,
        "insufficient_funds",
    )
    assert "need 36" in err.message and "loom credits deposit 36" in err.message
    assert client.ledger_verify().count == 0 and client.clusters(all_states=True) == []
    client.deposit("40")
    client.create_cluster({"name": "pay", "resources": {"cpus": 1}, "duration": "1h"})
    assert client.balance().model_dump()["escrowed"] == "36"
    running = client.wait_cluster("pay", timeout=20)
    assert running.state == "running"
    # Fake agents run no Ray: nobody vouches for them, so nothing would be billed. Stand in
    # for the honest peer that confirms the member twice, 2.2 s apart.
    assert coordinator.run_coro(vouch(coordinator.state.session, running.id)) == 1
    time.sleep(2.2)
    coordinator.run_coro(vouch(coordinator.state.session, running.id))
    step = coordinator.run_coro(run_settlement(coordinator.state))
    assert step.transactions == 1 and step.settled_micro >= 20_000
    with LoomClient(coordinator.url, supplier) as s:
        earned = s.earnings()
        assert earned.fee_bps == 500 and earned.nodes[0].name == "s1"
        assert earned.clusters[0].id == running.id
        assert earned.available == earned.nodes[0].paid != "0"
        paid = s.payout(earned.available, idempotency_key="w1")
        assert paid.balance == "0" and paid.receipt.startswith("embedded:")
        assert s.payout(earned.available, idempotency_key="w1").replayed
        _refused(lambda: s.payout("0.000001"), 402, "insufficient_earnings")
    down = client.delete_cluster("pay")
    assert down.state == "terminated"
    balance = client.balance()
    assert balance.escrowed == "0"
    spent = 40 - float(balance.balance)
    healthy = (down.ended_at or 0) - (running.ready_at or 0)
    assert 0 < spent <= 0.01 * healthy + 1e-6
    kinds = [h.kind for h in client.history()]
    assert kinds == ["refund", "hold", "deposit"]
    verified = client.ledger_verify()
    assert verified.ok and verified.total == "0" and verified.minted == "40"
    wait_for(lambda: {n.state for n in client.nodes()} == {"available"}, 10, "devices freed")
