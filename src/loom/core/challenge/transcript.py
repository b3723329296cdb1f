"""Byte-exact derivations shared by verifier, prover and offline evidence checks.

* ``challenge_id = SHA-256(tag ‖ canonical JSON of what the prover computes)[:16]``: it
  commits to the device id, the matrix shape, tile, rounds and ``seed0``. The prover derives
  it itself, so it never signs an id that binds inputs other than the ones it received.
* ``round_seed = SHA-256(tag ‖ challenge_id ‖ seed0 ‖ round ‖ nonce)``: fresh per round,
  unknown before the coordinator releases the nonce.
* ``root_statement = tag ‖ challenge_id ‖ round ‖ nonce ‖ root``: what the prover signs.
  Binding the nonce (and, through the id, ``seed0`` and the shape) into the signature is
  what makes a wrong opening *transferable* evidence: a third party can regenerate exactly
  the inputs the prover committed to, and the coordinator cannot frame a node by claiming
  other inputs.
"""

from __future__ import annotations

import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CHALLENGE_VERSION = 1
SEED_BYTES = 16
NONCE_BYTES = 16
ID_BYTES = 16
ROOT_BYTES = 32

_ID_TAG = b"loom/hwc/challenge-id/v1\x00"
_SEED_TAG = b"loom/hwc/round-seed/v1\x00"
_ROOT_TAG = b"loom/hwc/root/v1\x00"


def _u32(value: int) -> bytes:
    if not 0 <= value < 2**32:
        raise ValueError("value does not fit an unsigned 32-bit integer")
    return value.to_bytes(4, "big")


def _check_len(name: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, got {len(value)}")


def challenge_id(
    *,
    device_id: str,
    device_class: str,
    m: int,
    n: int,
    k: int,
    tile: int,
    rounds: int,
    seed0: bytes,
) -> bytes:
    """16-byte id committing to everything that determines the prover's arithmetic."""
    _check_len("seed0", seed0, SEED_BYTES)
    body = {
        "v": CHALLENGE_VERSION,
        "device_id": device_id,
        "device_class": device_class,
        "m": m,
        "n": n,
        "k": k,
        "tile": tile,
        "rounds": rounds,
        "seed0": seed0.hex(),
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(_ID_TAG + canonical.encode("ascii")).digest()[:ID_BYTES]


def round_seed(cid: bytes, seed0: bytes, round_index: int, nonce: bytes) -> bytes:
    """32-byte seed of round ``round_index`` (the generator uses its first 16 bytes)."""
    _check_len("challenge id", cid, ID_BYTES)
    _check_len("seed0", seed0, SEED_BYTES)
    _check_len("nonce", nonce, NONCE_BYTES)
    return hashlib.sha256(_SEED_TAG + cid + seed0 + _u32(round_index) + nonce).digest()


def root_statement(cid: bytes, round_index: int, nonce: bytes, root: bytes) -> bytes:
    """The exact bytes a prover signs to commit to ``root`` for round ``round_index``."""
    _check_len("challenge id", cid, ID_BYTES)
    _check_len("nonce", nonce, NONCE_BYTES)
    _check_len("root", root, ROOT_BYTES)
    return _ROOT_TAG + cid + _u32(round_index) + nonce + root


def verify_ed25519(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
