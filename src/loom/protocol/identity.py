"""Ed25519 identity: keys, signatures, and the request-signing scheme.

Every `/v1` HTTP request from the SDK carries four headers::

    X-Loom-Key        the caller's public key, 64 hex chars
    X-Loom-Timestamp  unix seconds (integer) on the caller's clock
    X-Loom-Nonce      16+ random bytes, hex; never reused
    X-Loom-Signature  Ed25519 signature (hex) over `canonical_request(...)`

The canonical string binds method, the path and the query string *exactly as sent* (still
percent-encoded: what the server received, byte for byte), a SHA-256 of the body, the
timestamp and the nonce, so no part of a request can be changed, reordered or replayed
unnoticed. A query that names one parameter twice is refused outright
(`duplicate_query_names`): which of the two a server reads is not something to sign.

A public key has exactly one spelling everywhere: 64 lower-case hex digits
(`parse_key_hex`). Any other spelling of the same key (upper case, spaces, an ``0x``
prefix) is refused rather than normalized, so one keypair can never be two accounts.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

HEADER_KEY = "x-loom-key"
HEADER_TIMESTAMP = "x-loom-timestamp"
HEADER_NONCE = "x-loom-nonce"
HEADER_SIGNATURE = "x-loom-signature"

#: Allowed difference between the caller's clock and the coordinator's.
MAX_CLOCK_SKEW_S = 60

_REQUEST_DOMAIN = "LOOM-REQUEST-V1"
_BINDING_DOMAIN = b"loom-node-binding:v1:"
_AGENT_AUTH_DOMAIN = b"loom-agent-auth:v1:"

#: The one spelling of a public key: 32 bytes as 64 lower-case hex digits.
KEY_HEX_RE = re.compile(r"[0-9a-f]{64}")
#: A signature: 64 bytes as 128 hex digits.
_SIG_HEX_RE = re.compile(r"[0-9a-fA-F]{128}")


class IdentityError(ValueError):
    """A key or signature that cannot be used; the message says why."""


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 private key and its public half."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed_hex(cls, seed_hex: str) -> KeyPair:
        try:
            seed = bytes.fromhex(seed_hex.strip())
        except ValueError:
            raise IdentityError("private key file is not hex") from None
        if len(seed) != 32:
            raise IdentityError("private key must be 32 bytes (64 hex chars)")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed_hex(self) -> str:
        raw = self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return raw.hex()

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_hex(self) -> str:
        return self.public_bytes.hex()

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def parse_key_hex(text: object, what: str = "public key") -> str:
    """Return `text` if it is a public key in its one spelling, else raise IdentityError.

    The spelling is 64 lower-case hex digits, nothing around them. Every edge (request
    headers, JSON bodies, paths, queries, the agent handshake) calls this, so an account,
    an owner binding and a payout destination can never differ by spelling alone.
    """
    if not isinstance(text, str):
        raise IdentityError(f"{what} must be a string of 64 lower-case hex digits")
    if KEY_HEX_RE.fullmatch(text):
        return text
    stripped = text.strip()
    if stripped.lower().startswith("0x"):
        hint = "drop the 0x prefix"
    elif stripped != text:
        hint = "remove the surrounding spaces"
    elif KEY_HEX_RE.fullmatch(text.lower()):
        hint = "write it in lower case"
    elif len(text) != 64:
        hint = f"it has {len(text)} characters, a key has 64"
    else:
        hint = "use only the digits 0-9 and a-f"
    raise IdentityError(f"{what} must be exactly 64 lower-case hex digits: {hint}")


def is_key_hex(text: object) -> bool:
    return isinstance(text, str) and KEY_HEX_RE.fullmatch(text) is not None


def parse_public_key(public_hex: str) -> Ed25519PublicKey:
    """Parse a public key in its one spelling (see `parse_key_hex`) or raise IdentityError."""
    raw = bytes.fromhex(parse_key_hex(public_hex))
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise IdentityError("not a valid Ed25519 public key") from None


def verify_signature(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """True when `signature_hex` is `public_hex`'s signature over `message`."""
    if not isinstance(signature_hex, str) or not _SIG_HEX_RE.fullmatch(signature_hex):
        return False
    try:
        key = parse_public_key(public_hex)
        signature = bytes.fromhex(signature_hex)
    except (IdentityError, ValueError):
        return False
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_query(query: str) -> str:
    """The query string as it is signed: exactly as sent, byte for byte.

    (It used to be sorted, which let a reordered ``limit=1&limit=3`` keep a valid signature
    while changing the value the server read.)
    """
    return query


def duplicate_query_names(query: str) -> list[str]:
    """The parameter names that occur more than once in `query` (refused at the edge)."""
    seen: set[str] = set()
    dupes: list[str] = []
    for name, _value in parse_qsl(query, keep_blank_values=True):
        if name in seen and name not in dupes:
            dupes.append(name)
        seen.add(name)
    return dupes


def canonical_request(
    method: str, path: str, query: str, body: bytes, timestamp: int, nonce: str
) -> bytes:
    parts = [
        _REQUEST_DOMAIN,
        method.upper(),
        path,
        canonical_query(query),
        body_digest(body),
        str(timestamp),
        nonce,
    ]
    return "\n".join(parts).encode()


def sign_request(
    key: KeyPair,
    method: str,
    path: str,
    query: str,
    body: bytes,
    *,
    timestamp: int,
    nonce: str | None = None,
) -> dict[str, str]:
    """Return the four X-Loom-* headers that sign this request."""
    nonce = nonce or secrets.token_hex(16)
    message = canonical_request(method, path, query, body, timestamp, nonce)
    return {
        HEADER_KEY: key.public_hex,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: key.sign(message).hex(),
    }


def node_id_for(node_public_hex: str) -> str:
    """A node's id is derived from its key, so a reconnecting agent keeps its id."""
    return "n-" + hashlib.sha256(bytes.fromhex(parse_key_hex(node_public_hex))).hexdigest()[:12]


def binding_message(node_public_hex: str) -> bytes:
    """What an owner key signs to bind a node key to itself."""
    return _BINDING_DOMAIN + node_public_hex.encode()


def agent_auth_message(nonce_hex: str) -> bytes:
    """What a node key signs to answer the coordinator's handshake nonce."""
    return _AGENT_AUTH_DOMAIN + nonce_hex.encode()
