"""Wire objects of the challenge: pydantic models whose JSON form has bytes as lowercase hex.

``model.model_dump(mode="json")`` gives a JSON-friendly dict; ``Model.model_validate(d)``
accepts the same dict back (hex strings) or Python ``bytes``. Transport-agnostic: the
protocol layer wraps these in its own envelopes.

Flow (coordinator ⇄ agent)::

    ChallengeStart   C→A  spec + nonces of rounds 0..d-1
    RootCommit       A→C  one per round, in order
    NonceRelease     C→A  nonce of round r+d, released when root r arrives
    OpeningsRequest  C→A  after the last root
    OpeningsResponse A→C
    ChallengeResult  (coordinator side; may carry Evidence)
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)

from loom.core.challenge.params import ChallengeParams
from loom.core.challenge.transcript import (
    ID_BYTES,
    NONCE_BYTES,
    ROOT_BYTES,
    SEED_BYTES,
    challenge_id,
)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_LEAF_BYTES = 1 << 20


def _hex_validator(length: int | None, max_length: int = MAX_LEAF_BYTES) -> PlainValidator:
    def parse(value: object) -> bytes:
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
        elif isinstance(value, str):
            try:
                data = bytes.fromhex(value)
            except ValueError:
                raise ValueError("expected a hex string") from None
        else:
            raise ValueError("expected a hex string")
        if length is not None and len(data) != length:
            raise ValueError(f"expected {length} bytes, got {len(data)}")
        if len(data) > max_length:
            raise ValueError(f"more than {max_length} bytes")
        return data

    return PlainValidator(parse)


def _hex_schema(length: int | None) -> WithJsonSchema:
    schema: dict[str, object] = {"type": "string", "pattern": "^[0-9a-fA-F]*$"}
    if length is not None:
        schema["minLength"] = schema["maxLength"] = 2 * length
    return WithJsonSchema(schema)


_to_hex = PlainSerializer(lambda b: b.hex(), return_type=str)

HexBytes = Annotated[bytes, _hex_validator(None), _to_hex, _hex_schema(None)]
ChallengeIdBytes = Annotated[bytes, _hex_validator(ID_BYTES), _to_hex, _hex_schema(ID_BYTES)]
SeedBytes = Annotated[bytes, _hex_validator(SEED_BYTES), _to_hex, _hex_schema(SEED_BYTES)]
NonceBytes = Annotated[bytes, _hex_validator(NONCE_BYTES), _to_hex, _hex_schema(NONCE_BYTES)]
RootBytes = Annotated[bytes, _hex_validator(ROOT_BYTES), _to_hex, _hex_schema(ROOT_BYTES)]
SignatureBytes = Annotated[
    bytes, _hex_validator(SIGNATURE_BYTES), _to_hex, _hex_schema(SIGNATURE_BYTES)
]
PublicKeyBytes = Annotated[
    bytes, _hex_validator(PUBLIC_KEY_BYTES), _to_hex, _hex_schema(PUBLIC_KEY_BYTES)
]

RoundIndex = Annotated[int, Field(ge=0, lt=2**32)]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChallengeSpec(_Wire):
    """Everything the prover needs to compute; ``challenge_id`` must match the derivation."""

    challenge_id: ChallengeIdBytes
    device_id: str = Field(min_length=1, max_length=200)
    seed0: SeedBytes
    params: ChallengeParams

    @classmethod
    def create(cls, device_id: str, params: ChallengeParams, seed0: bytes) -> ChallengeSpec:
        return cls(
            challenge_id=derive_challenge_id(device_id, params, seed0),
            device_id=device_id,
            seed0=seed0,
            params=params,
        )

    @model_validator(mode="after")
    def _id_matches(self) -> ChallengeSpec:
        expected = derive_challenge_id(self.device_id, self.params, self.seed0)
        if self.challenge_id != expected:
            raise ValueError(
                "challenge_id does not match device_id, params and seed0 "
                f"(expected {expected.hex()})"
            )
        return self


def derive_challenge_id(device_id: str, params: ChallengeParams, seed0: bytes) -> bytes:
    return challenge_id(
        device_id=device_id,
        device_class=params.device_class,
        m=params.m,
        n=params.n,
        k=params.k,
        tile=params.tile,
        rounds=params.rounds,
        seed0=seed0,
    )


class NonceRelease(_Wire):
    """Coordinator → agent: the nonce that starts round ``round``."""

    challenge_id: ChallengeIdBytes
    round: RoundIndex
    nonce: NonceBytes


class ChallengeStart(_Wire):
    """Coordinator → agent: the spec and the first ``depth`` nonces."""

    spec: ChallengeSpec
    nonces: list[NonceRelease]


class RootCommit(_Wire):
    """Agent → coordinator: signed Merkle root of one round.

    ``signature`` is Ed25519 over :func:`loom.core.challenge.transcript.root_statement`.
    """

    challenge_id: ChallengeIdBytes
    round: RoundIndex
    root: RootBytes
    signature: SignatureBytes


class OpeningRequest(_Wire):
    """One tile to open: round r, tile row ti (= leaf index), tile column tj."""

    round: RoundIndex
    tile_row: int = Field(ge=0)
    tile_col: int = Field(ge=0)


class OpeningsRequest(_Wire):
    challenge_id: ChallengeIdBytes
    openings: list[OpeningRequest]


class Opening(_Wire):
    """The prover's answer: the whole leaf (tile-row of digests) and its Merkle path."""

    round: RoundIndex
    tile_row: int = Field(ge=0)
    tile_col: int = Field(ge=0)
    leaf: HexBytes
    path: list[HexBytes] = Field(max_length=64)

    @property
    def request(self) -> OpeningRequest:
        return OpeningRequest(round=self.round, tile_row=self.tile_row, tile_col=self.tile_col)


class OpeningsResponse(_Wire):
    challenge_id: ChallengeIdBytes
    openings: list[Opening]


EVIDENCE_KIND: Final = "loom.hardware-challenge.evidence/v1"


class Evidence(_Wire):
    """A wrong tile digest under a signed root: re-checkable offline by anyone.

    ``claimed_digest``/``true_digest`` are informational; :func:`verify_evidence`
    recomputes both from the rest.
    """

    kind: Literal["loom.hardware-challenge.evidence/v1"] = "loom.hardware-challenge.evidence/v1"
    spec: ChallengeSpec
    node_public_key: PublicKeyBytes
    nonce: NonceBytes
    root: RootBytes
    signature: SignatureBytes
    opening: Opening
    claimed_digest: HexBytes
    true_digest: HexBytes
    note: str = ""


class ChallengeResult(_Wire):
    """The verifier's decision, with the figures behind it."""

    challenge_id: ChallengeIdBytes
    device_id: str
    device_class: str
    passed: bool
    reason: str
    measured_rate: float | None = Field(description="best-window rate, INT8 ops/s")
    required_rate: float
    best_window_start: int | None = None
    timing_passed: bool = False
    openings_checked: int = 0
    openings_failed: int = 0
    evidence: list[Evidence] = Field(default_factory=list)
