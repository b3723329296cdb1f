"""Fraud evidence: a wrong tile digest under a root the node signed.

An evidence file holds the challenge spec (params, device id, ``seed0``), the node's public
key, the round's nonce, the signed root with its signature, and the opening (leaf + Merkle
path). :func:`verify_evidence` needs nothing else: it re-derives the challenge id, checks the
signature over the root statement, the Merkle path, regenerates the inputs and recomputes
the tile. Only the binding of the key to a node is outside the file (the registry's job).

A *timing* failure is never evidence: it rests on the coordinator's clock alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from loom.core.challenge.messages import ChallengeSpec, Evidence, Opening, RootCommit
from loom.core.challenge.opening import check_opening
from loom.core.challenge.transcript import root_statement, verify_ed25519


def build_evidence(
    spec: ChallengeSpec,
    node_public_key: bytes,
    nonce: bytes,
    commit: RootCommit,
    opening: Opening,
    claimed_digest: bytes,
    true_digest: bytes,
) -> Evidence:
    return Evidence(
        spec=spec,
        node_public_key=node_public_key,
        nonce=nonce,
        root=commit.root,
        signature=commit.signature,
        opening=opening,
        claimed_digest=claimed_digest,
        true_digest=true_digest,
        note=(
            f"node key {node_public_key.hex()} signed root {commit.root.hex()} for round "
            f"{commit.round} of challenge {spec.challenge_id.hex()}; tile "
            f"({opening.round}, {opening.tile_row}, {opening.tile_col}) was committed as "
            f"{claimed_digest.hex()} but its true digest is {true_digest.hex()}"
        ),
    )


def verify_evidence(evidence: str | bytes | Mapping[str, Any] | Evidence) -> tuple[bool, str]:
    """Re-check evidence offline. Returns (True, why) only if it proves a wrong commitment.

    Accepts the JSON text, the parsed dict or the model. Never raises on bad input: a file
    that does not parse is simply not evidence.
    """
    try:
        if isinstance(evidence, Evidence):
            ev = evidence
        elif isinstance(evidence, str | bytes):
            ev = Evidence.model_validate(json.loads(evidence))
        else:
            ev = Evidence.model_validate(dict(evidence))
    except (ValidationError, ValueError, TypeError) as exc:
        return False, f"not valid evidence: {_first_line(exc)}"

    spec, op = ev.spec, ev.opening
    statement = root_statement(spec.challenge_id, op.round, ev.nonce, ev.root)
    if not verify_ed25519(ev.node_public_key, ev.signature, statement):
        return False, (
            "the signature does not verify: key "
            f"{ev.node_public_key.hex()} did not sign this root for round {op.round} "
            f"of challenge {spec.challenge_id.hex()} with this nonce"
        )
    check = check_opening(spec, ev.nonce, ev.root, op)
    if check.status == "wrong_digest":
        assert check.claimed_digest is not None
        assert check.true_digest is not None
        return True, (
            f"proven: key {ev.node_public_key.hex()} signed root {ev.root.hex()} for round "
            f"{op.round} of challenge {spec.challenge_id.hex()} (device {spec.device_id!r}, "
            f"class {spec.params.device_class}); under it, tile ({op.round}, {op.tile_row}, "
            f"{op.tile_col}) is committed as {check.claimed_digest.hex()} but recomputing it "
            f"from seed0 and the nonce gives {check.true_digest.hex()}"
        )
    if check.status == "ok":
        return False, "not evidence: the committed digest is the correct one"
    return False, f"not evidence: {check.detail}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
