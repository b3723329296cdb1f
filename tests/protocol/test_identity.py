from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom.protocol import identity
from loom.protocol.identity import IdentityError, KeyPair
from loom.protocol.keystore import KeyStore


def test_signed_request_verifies_and_any_change_breaks_it() -> None:
    key = KeyPair.generate()
    headers = identity.sign_request(key, "POST", "/v1/x", "a=1&b=2", b'{"a":1}', timestamp=100)
    msg = identity.canonical_request(
        "POST", "/v1/x", "a=1&b=2", b'{"a":1}', 100, headers[identity.HEADER_NONCE]
    )
    sig = headers[identity.HEADER_SIGNATURE]
    assert identity.verify_signature(key.public_hex, msg, sig)
    for changed in (
        identity.canonical_request("GET", "/v1/x", "a=1&b=2", b'{"a":1}', 100, "n"),
        identity.canonical_request("POST", "/v1/y", "a=1&b=2", b'{"a":1}', 100, "n"),
        identity.canonical_request("POST", "/v1/x", "a=1&b=3", b'{"a":1}', 100, "n"),
        # the query is signed exactly as sent: reordering it breaks the signature
        identity.canonical_request(
            "POST", "/v1/x", "b=2&a=1", b'{"a":1}', 100, headers[identity.HEADER_NONCE]
        ),
        identity.canonical_request("POST", "/v1/x", "a=1&b=2", b'{"a":2}', 100, "n"),
        identity.canonical_request("POST", "/v1/x", "a=1&b=2", b'{"a":1}', 101, "n"),
    ):
        assert not identity.verify_signature(key.public_hex, changed, sig)
    other = KeyPair.generate()
    assert not identity.verify_signature(other.public_hex, msg, sig)


@given(st.binary(min_size=0, max_size=200))
def test_garbage_signatures_never_verify_and_never_raise(junk: bytes) -> None:
    key = KeyPair.generate()
    assert not identity.verify_signature(key.public_hex, b"m", junk.hex())
    assert not identity.verify_signature(junk.hex(), b"m", junk.hex())


def test_node_id_is_stable_and_derived_from_key() -> None:
    key = KeyPair.generate()
    assert identity.node_id_for(key.public_hex) == identity.node_id_for(key.public_hex)
    assert identity.node_id_for(key.public_hex).startswith("n-")


def test_keystore_writes_private_keys_0600_and_round_trips(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    key = store.create("alice")
    path = store.path("alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load("alice").public_hex == key.public_hex
    assert store.names() == ["alice"]
    with pytest.raises(IdentityError, match="already exists"):
        store.create("alice")
    with pytest.raises(IdentityError, match="loom key new"):
        store.load("bob")
    with pytest.raises(IdentityError, match="invalid key name"):
        store.path("../etc/passwd")
    path.write_text("zz")
    with pytest.raises(IdentityError, match="not hex"):
        store.load("alice")


@pytest.mark.parametrize(
    ("spelling", "hint"),
    [
        ("upper", "lower case"),
        ("spaced", "spaces"),
        ("0x", "0x prefix"),
        ("short", "63 characters"),
        ("long", "65 characters"),
        ("nonhex", "0-9 and a-f"),
        ("arabic", "0-9 and a-f"),
    ],
)
def test_a_public_key_has_one_spelling(spelling: str, hint: str) -> None:
    key = KeyPair.generate().public_hex
    other = {
        "upper": key.upper(),
        "spaced": f" {key} ",
        "0x": "0x" + key,
        "short": key[:63],
        "long": key + "0",
        "nonhex": "g" + key[1:],
        "arabic": "\u0661" + key[1:],
    }[spelling]
    assert identity.parse_key_hex(key) == key
    with pytest.raises(IdentityError, match=hint):
        identity.parse_key_hex(other, "owner_key")
    with pytest.raises(IdentityError):
        identity.parse_public_key(other)
    assert not identity.is_key_hex(other)


def test_duplicate_query_names_are_found() -> None:
    assert identity.duplicate_query_names("limit=1&after=2") == []
    assert identity.duplicate_query_names("limit=1&limit=3") == ["limit"]
    assert identity.duplicate_query_names("a=1&b=2&a=&b=1") == ["a", "b"]
    assert identity.duplicate_query_names("") == []
    assert identity.canonical_query("b=2&a=1") == "b=2&a=1"


@given(st.text(max_size=80))
def test_any_text_is_a_key_only_in_its_one_spelling(text: str) -> None:
    try:
        parsed = identity.parse_key_hex(text)
    except IdentityError:
        assert not identity.is_key_hex(text)
    else:
        assert parsed == text and len(text) == 64 and text == text.lower()
