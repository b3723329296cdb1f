"""Ed25519 identity: keys, signatures, and the request-signing scheme.

Every `/v1` HTTP request from the SDK carries four headers::

    X-Loom-Key        the caller's public key, 64 hex chars
    X-Loom-Timestamp  unix seconds (integer) on the caller's clock
    X-Loom-Nonce      16+ random bytes, hex; never reused
    X-Loom-Signature  Ed25519 signature (hex) over `canonical_request(...)`

The canonical string binds method, path, query (sorted), a SHA-256 of the body, the
timestamp and the nonce, so no part of a request can be changed or replayed unnoticed.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

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


def parse_public_key(public_hex: str) -> Ed25519PublicKey:
    """Parse a 64-hex-char Ed25519 public key or raise IdentityError."""
    try:
        raw = bytes.fromhex(public_hex)
    except ValueError:
        raise IdentityError("public key is not hex") from None
    if len(raw) != 32:
        raise IdentityError("public key must be 32 bytes (64 hex chars)")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise IdentityError("not a valid Ed25519 public key") from None


def verify_signature(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """True when `signature_hex` is `public_hex`'s signature over `message`."""
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
    """Sort query parameters so that encoding differences do not break signatures."""
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return urlencode(pairs)


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
    return "n-" + hashlib.sha256(bytes.fromhex(node_public_hex)).hexdigest()[:12]


def binding_message(node_public_hex: str) -> bytes:
    """What an owner key signs to bind a node key to itself."""
    return _BINDING_DOMAIN + node_public_hex.encode()


def agent_auth_message(nonce_hex: str) -> bytes:
    """What a node key signs to answer the coordinator's handshake nonce."""
    return _AGENT_AUTH_DOMAIN + nonce_hex.encode()
