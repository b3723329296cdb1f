"""What the public sees (issue 14 §4): the network, not the people.

A user with a planted cluster name, a planted idempotency key ("memo") and a planted env
value runs a cluster through its whole money life (deposit, hold, settle, refund). Then
every unsigned route of the coordinator — every page, every explorer API route, the
public ledger, the OpenAPI schema, metrics — is fetched without a signature, with every
path parameter filled by the real ids. None of the planted strings nor the user's public
key appears anywhere, and `loom ledger verify` (re-hashing the public chain) still passes.
The owner still sees their own money through signed routes.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from sqlalchemy import text

import loom.explorer
from loom.client.sdk import LoomClient
from loom.coordinator.db.engine import create_engine, downgrade, migrate, session_factory
from loom.coordinator.loops.settlement import run_settlement
from loom.coordinator.services import ledger
from loom.coordinator.services import ledger_privacy as privacy
from loom.core.ledger import Entry, Transaction
from loom.core.ledger_verify import verify_chain
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread
from support.vouch import vouch

NAME = "plantedname7f3a"
MEMO = "plantedmemo9c1e"
ENV = "plantedenv4b2d"
STATIC = Path(loom.explorer.__file__).parent / "static"


#: Pages outside the OpenAPI schema (server-rendered explorer, metrics, assets).
PAGES = ["/", "/nodes", "/nodes/{node_id}", "/clusters", "/clusters/{cluster_id}", "/ledger",
         "/metrics", "/favicon.ico"]  # fmt: skip


def _public_urls(coordinator: CoordinatorThread, ids: dict[str, str]) -> list[str]:
    """Every GET route of the app (schema and pages), path parameters filled with real ids."""
    paths = [p for p, ops in coordinator.app.openapi()["paths"].items() if "get" in ops]
    statics = sorted(f.name for f in STATIC.iterdir() if f.is_file())
    urls = [f"/explorer/static/{name}" for name in statics]
    for path in [*paths, *PAGES]:
        for param in re.findall(r"{(\w+)}", path):
            path = path.replace("{" + param + "}", ids.get(param, ids["cluster_id"]))
        urls.append(path)
    return sorted(set(urls))


def test_public_views_show_no_names_memos_or_user_keys(
    coordinator: CoordinatorThread, client: LoomClient, fakes: FakeAgents, user_key: KeyPair
) -> None:
    node = fakes.add("box", price="36", cpu_cores=2)
    coordinator.run_coro(force_available(coordinator.state.sessions, [node.node_id]))
    client.deposit("50", idempotency_key=MEMO)
    client.create_cluster(
        {"name": NAME, "resources": {"cpus": 1}, "duration": "1h", "env": {"X_PLANT": ENV}}
    )
    cluster = client.wait_cluster(NAME, timeout=20)
    assert cluster.state == "running", cluster.reason
    coordinator.run_coro(vouch(coordinator.state.session, cluster.id))
    coordinator.run_coro(vouch(coordinator.state.session, cluster.id, at=_later(cluster, 5)))
    assert coordinator.run_coro(run_settlement(coordinator.state)).transactions >= 1
    client.delete_cluster(NAME)
    kinds = sorted({t.kind for t in client.ledger_transactions()})
    assert kinds == ["deposit", "hold", "refund", "settle"]
    secrets_to_hide = {NAME, MEMO, ENV, user_key.public_hex}

    ids = {"cluster_id": cluster.id, "node_id": node.node_id, "name": "overview"}
    urls = _public_urls(coordinator, ids)
    assert "/v1/ledger/transactions" in urls and f"/explorer/api/clusters/{cluster.id}" in urls
    fetched = 0
    with httpx.Client(base_url=coordinator.url, timeout=30) as anon:
        for url in urls:
            response = anon.get(url)
            if response.status_code in (401, 403):
                continue  # signed routes refuse the anonymous caller: nothing to leak
            assert response.status_code < 500, (url, response.text[:300])
            fetched += 1
            for secret in secrets_to_hide:
                assert secret not in response.text, f"{url} shows {secret!r}"
        # The ledger's pages, one transaction at a time too.
        for seq in range(0, 6):
            page = anon.get("/v1/ledger/transactions", params={"after": seq, "limit": 1})
            for secret in secrets_to_hide:
                assert secret not in page.text
    assert fetched >= 10

    # Anyone can still re-verify the whole chain from the public transactions.
    txns = [
        Transaction(
            seq=t.seq,
            kind=t.kind,
            idempotency_key=t.idempotency_key,
            entries=tuple(Entry(e.account, int(e.amount_micro)) for e in t.entries),
            meta=t.meta,
            created_at=t.created_at,
            prev_hash=t.prev_hash,
            hash=t.hash,
        )
        for t in client.ledger_transactions()
    ]
    verified = client.ledger_verify()
    assert verified.ok and verify_chain(txns, expected_head=verified.head_hash).ok
    # The owner sees their own money through signed routes, as before.
    balance = client.balance()
    assert balance.escrowed == "0" and 0 < float(balance.balance) < 50
    history = client.history()
    assert [h.kind for h in history] == ["refund", "hold", "deposit"]
    assert [h.cluster for h in history] == [cluster.id, cluster.id, ""]


def _later(cluster: object, seconds: float) -> float:
    ready = getattr(cluster, "ready_at", None) or 0.0
    return float(ready) + seconds


async def test_money_from_before_pseudonyms_keeps_its_names(db_url: str) -> None:
    """Migration 0007 maps accounts that already hold money to themselves (the chain
    cannot be rewritten), so balances read the same after the upgrade."""
    engine = create_engine(db_url)
    user = "user:" + "ab" * 32
    try:
        await migrate(engine, "0006")
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO account_balances (account, balance_micro) VALUES (:a, 7)"),
                {"a": user},
            )
        await migrate(engine)
        async with session_factory(engine)() as session:
            assert await ledger.balance(session, user) == 7
            names = await privacy.public_names(session, [user, "user:" + "cd" * 32])
            assert names[user] == user and names["user:" + "cd" * 32] == "user:" + "cd" * 32
            new = await privacy.public_names(session, ["user:" + "cd" * 32], create=True)
            assert new["user:" + "cd" * 32] != "user:" + "cd" * 32  # a new one: a pseudonym
            await session.rollback()
        await downgrade(engine, "0006")
        await migrate(engine)
    finally:
        await engine.dispose()
