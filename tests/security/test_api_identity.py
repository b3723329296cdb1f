"""Identities and requests, as an attacker tries them (issue 14 §2), on a real coordinator.

* one keypair, another spelling of its key (upper case, spaces, 0x): never a second
  account; refused at the edge with 401 `auth_bad_key` (never a 500), in headers, queries
  and the agent handshake's owner binding;
* a valid signature over `limit=1&limit=3`, or over a reordered query: refused;
* the SDK, which signs, keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loom.client.sdk import LoomClient
from loom.protocol import identity
from loom.protocol.identity import KeyPair, agent_auth_message, binding_message
from loom.protocol.messages import CLOSE_AUTH_FAILED
from support.rawagent import auth_message, ws_url
from support.servers import CoordinatorThread
from support.signing import error, send, signed


@pytest.mark.parametrize(
    "spelling",
    [
        str.upper,
        lambda k: k[:40].upper() + k[40:],
        lambda k: f"0x{k}",
        lambda k: k[:32] + " " + k[32:],
    ],
    ids=["upper", "mixed-case", "0x", "inner-space"],
)
def test_another_spelling_of_a_key_is_no_second_account(
    coordinator: CoordinatorThread, client: LoomClient, user_key: KeyPair, spelling: Any
) -> None:
    client.deposit("10")
    other = spelling(user_key.public_hex)
    # The signature is valid (it is the same keypair), only the spelling differs.
    for path in ("/v1/credits/balance", "/v1/me", "/v1/credits/history"):
        r = send(coordinator.url, user_key, "GET", path, key_header=other)
        assert r.status_code == 401, r.text
        assert error(r)["code"] == "auth_bad_key"
        assert "64 lower-case hex" in error(r)["message"]
    # ... and the real account is untouched and still works through the SDK.
    assert client.balance().balance == "10"
    assert client.me().key == user_key.public_hex


def test_keys_in_queries_have_one_spelling(
    coordinator: CoordinatorThread, client: LoomClient, user_key: KeyPair
) -> None:
    for owner in (user_key.public_hex.upper(), "0x" + user_key.public_hex, "ab" * 31):
        r = send(coordinator.url, user_key, "GET", "/v1/nodes", f"owner={owner}")
        assert r.status_code == 400, r.text
        assert (error(r)["code"], error(r)["field"]) == ("invalid_key", "owner")
    assert client.nodes(owner=user_key.public_hex) == []


def test_the_signature_covers_the_query_exactly_as_sent(
    coordinator: CoordinatorThread, client: LoomClient, user_key: KeyPair
) -> None:
    url = coordinator.url
    client.deposit("1")
    client.deposit("2")
    # A duplicate parameter under a valid signature: refused, whatever the order.
    for query in ("limit=1&limit=3", "limit=3&limit=1", "limit=1&before=9&limit=3"):
        r = send(url, user_key, "GET", "/v1/credits/history", query)
        assert r.status_code == 400, r.text
        assert (error(r)["code"], error(r)["field"]) == ("duplicate_query_param", "limit")
    # A signature over one order does not cover another.
    r = send(
        url, user_key, "GET", "/v1/credits/history", "before=99&limit=1",
        signed_query="limit=1&before=99",
    )  # fmt: skip
    assert r.status_code == 401 and error(r)["code"] == "auth_bad_signature"
    # Unsigned public routes refuse duplicates too.
    r = httpx.get(f"{url}/v1/ledger/transactions?limit=1&limit=3", timeout=10)
    assert r.status_code == 400 and error(r)["code"] == "duplicate_query_param"
    # The SDK signs what it sends.
    assert len(client.history(limit=1)) == 1
    assert len(client.ledger_transactions(after=0, limit=1)) == 1


def test_malformed_auth_headers_are_401_never_500(
    coordinator: CoordinatorThread, user_key: KeyPair
) -> None:
    url = coordinator.url
    good = signed(user_key, "GET", "/v1/me")
    for name, value in (
        (identity.HEADER_TIMESTAMP, "١٢٣"),
        (identity.HEADER_TIMESTAMP, "9" * 400),
        (identity.HEADER_NONCE, "ab" * 8 + "\n"),
        (identity.HEADER_SIGNATURE, "zz"),
        (identity.HEADER_SIGNATURE, "ab" * 5000),
        (identity.HEADER_KEY, "é" * 64),
    ):
        headers = dict(good, **{name: value})
        try:
            r = httpx.get(f"{url}/v1/me", headers=headers, timeout=10)
        except (httpx.LocalProtocolError, UnicodeEncodeError):
            continue  # the client library itself refuses to send it
        assert r.status_code == 401, (name, value[:20], r.text)
        assert "Traceback" not in r.text


def test_agent_owner_binding_needs_the_one_spelling(coordinator: CoordinatorThread) -> None:
    """A supplier registering with an upper-case owner key (validly signed) is refused:
    such a key once became an account the ledger could not pay, breaking settlement."""
    url = coordinator.url
    node, owner = KeyPair.generate(), KeyPair.generate()

    async def attempt(field: str, spell: Any) -> tuple[int | None, str]:
        async with connect(ws_url(url), open_timeout=5) as ws:
            hello = json.loads(await ws.recv())
            auth = auth_message(hello["nonce"], node, owner)
            auth[field] = spell(auth[field])
            if field == "node_key":  # sign for the misspelt key, as an attacker would
                auth["nonce_sig"] = node.sign(agent_auth_message(hello["nonce"])).hex()
                auth["binding_sig"] = owner.sign(binding_message(auth["node_key"])).hex()
            await ws.send(json.dumps(auth))
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            await ws.wait_closed()
            return ws.close_code, ws.close_reason or ""

    for field in ("owner_key", "node_key"):
        for spell in (str.upper, lambda k: "0x" + k, lambda k: k + " "):
            code, reason = asyncio.run(attempt(field, spell))
            assert code == CLOSE_AUTH_FAILED, (field, code, reason)
            assert reason.startswith(field) and "64 lower-case hex" in reason
    with httpx.Client(base_url=url) as http:
        assert http.get("/healthz").json()["status"] == "ok"
    # Nothing was registered under any spelling.
    with LoomClient(url, owner) as c:
        assert c.nodes() == []
