"""The HTTP API against a real coordinator: signing, bad input, error shapes."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from loom.client.sdk import LoomAPIError, LoomClient
from loom.protocol import identity
from loom.protocol.identity import KeyPair
from support.servers import CoordinatorThread


def _signed(key: KeyPair, method: str, url: str, body: bytes = b"", **kw: object) -> httpx.Response:
    parsed = httpx.URL(url)
    ts = int(kw.pop("timestamp", time.time()))  # type: ignore[call-overload]
    nonce = kw.pop("nonce", None)
    headers = identity.sign_request(
        key,
        method,
        parsed.path,
        parsed.query.decode(),
        body,
        timestamp=ts,
        nonce=nonce,  # type: ignore[arg-type]
    )
    headers["content-type"] = "application/json"
    return httpx.request(method, url, content=body, headers=headers)


def _error(resp: httpx.Response) -> dict[str, str]:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert "Traceback" not in resp.text
    return body["error"]  # type: ignore[no-any-return]


def test_health_and_openapi(coordinator: CoordinatorThread) -> None:
    health = httpx.get(f"{coordinator.url}/healthz").json()
    assert health["status"] == "ok" and health["database"] == "ok"
    spec = httpx.get(f"{coordinator.url}/openapi.json").json()
    assert "/v1/nodes" in spec["paths"]


def test_unknown_key_is_a_new_account(client: LoomClient, user_key: KeyPair) -> None:
    me = client.me()
    assert me.key == user_key.public_hex
    assert me.nodes == 0
    assert client.me().created_at == me.created_at


def test_unsigned_request_refused(coordinator: CoordinatorThread) -> None:
    resp = httpx.get(f"{coordinator.url}/v1/nodes")
    assert resp.status_code == 401
    assert _error(resp)["code"] == "auth_missing"


def test_tampered_body_refused(coordinator: CoordinatorThread, user_key: KeyPair) -> None:
    url = f"{coordinator.url}/v1/nodes/n-000000000000"
    headers = identity.sign_request(
        user_key,
        "PATCH",
        "/v1/nodes/n-000000000000",
        "",
        b'{"price":"1"}',
        timestamp=int(time.time()),
    )
    resp = httpx.request("PATCH", url, content=b'{"price":"9"}', headers=headers)
    assert resp.status_code == 401
    assert _error(resp)["code"] == "auth_bad_signature"


def test_signature_by_other_key_refused(coordinator: CoordinatorThread, user_key: KeyPair) -> None:
    headers = identity.sign_request(
        user_key, "GET", "/v1/nodes", "", b"", timestamp=int(time.time())
    )
    headers[identity.HEADER_KEY] = KeyPair.generate().public_hex
    resp = httpx.get(f"{coordinator.url}/v1/nodes", headers=headers)
    assert resp.status_code == 401
    assert _error(resp)["code"] == "auth_bad_signature"


def test_clock_skew_refused(coordinator: CoordinatorThread, user_key: KeyPair) -> None:
    resp = _signed(user_key, "GET", f"{coordinator.url}/v1/nodes", timestamp=time.time() - 120)
    assert resp.status_code == 401
    err = _error(resp)
    assert err["code"] == "auth_clock_skew"
    assert "clock" in err["message"]


def test_replayed_nonce_refused(coordinator: CoordinatorThread, user_key: KeyPair) -> None:
    nonce = "ab" * 16
    first = _signed(user_key, "GET", f"{coordinator.url}/v1/nodes", nonce=nonce)
    assert first.status_code == 200
    again = _signed(user_key, "GET", f"{coordinator.url}/v1/nodes", nonce=nonce)
    assert again.status_code == 401
    assert _error(again)["code"] == "auth_replayed_nonce"


def test_malformed_key_header_refused(coordinator: CoordinatorThread, user_key: KeyPair) -> None:
    headers = identity.sign_request(
        user_key, "GET", "/v1/nodes", "", b"", timestamp=int(time.time())
    )
    headers[identity.HEADER_KEY] = "not-hex"
    resp = httpx.get(f"{coordinator.url}/v1/nodes", headers=headers)
    assert resp.status_code == 401
    assert _error(resp)["code"] == "auth_bad_key"


def test_unknown_route_is_json_404(coordinator: CoordinatorThread) -> None:
    resp = httpx.get(f"{coordinator.url}/v1/nope")
    assert resp.status_code == 404
    assert _error(resp)["code"] == "not_found"


def test_method_not_allowed_is_json(coordinator: CoordinatorThread) -> None:
    resp = httpx.delete(f"{coordinator.url}/healthz")
    assert resp.status_code == 405
    assert _error(resp)["code"] == "method_not_allowed"


def test_unknown_node_is_404(client: LoomClient) -> None:
    with pytest.raises(LoomAPIError) as info:
        client.node("n-doesnotexist")
    assert info.value.status == 404 and info.value.code == "node_not_found"


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        (b"{not json", "malformed_json", "not valid JSON"),
        (b'{"price": 5}', "invalid_request", "price"),
        (b'{"price": "1", "colour": "red"}', "invalid_request", "colour: unknown field"),
        (b"[1,2]", "invalid_request", ""),
    ],
)
def test_bad_bodies_get_400_with_code(
    coordinator: CoordinatorThread, user_key: KeyPair, body: bytes, code: str, needle: str
) -> None:
    resp = _signed(user_key, "PATCH", f"{coordinator.url}/v1/nodes/n-1", body)
    assert resp.status_code == 400, resp.text
    err = _error(resp)
    assert err["code"] == code
    assert needle in err["message"]


def test_oversized_body_refused_with_413(coordinator: CoordinatorThread, user_key: KeyPair) -> None:
    body = json.dumps({"name": "x" * (1 << 20)}).encode()
    resp = _signed(user_key, "PATCH", f"{coordinator.url}/v1/nodes/n-1", body)
    assert resp.status_code == 413
    assert _error(resp)["code"] == "body_too_large"


def test_invalid_state_filter_is_400(client: LoomClient) -> None:
    with pytest.raises(LoomAPIError) as info:
        client.nodes(state="sleeping")
    assert info.value.code == "invalid_state"
    assert "available" in info.value.message
