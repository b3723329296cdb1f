"""Typed agent commands: one model per command the coordinator sends an agent, and its reply.

On the wire nothing changes: a command travels as ``Command{id, name, args}`` and comes back
as ``Ack{id, ok, error, result}`` (see :mod:`loom.protocol.messages`); ``args`` is the
command model's JSON and ``result`` its reply model's JSON. Both sides parse what they
receive leniently (``extra="ignore"``: a newer peer's added fields are dropped) while the
required fields and their types are still checked; a command that does not parse is
answered with a negative ack that says which field is wrong (:func:`parse_command`).

=========================  ===========================  ==================================
name                       command                      reply
=========================  ===========================  ==================================
``member.start``           :class:`MemberStart`         :class:`MemberStarted`
``member.stop``            :class:`MemberStop`          :class:`MemberStopped`
``member.sync``            :class:`MemberSync`          :class:`MemberSynced`
``member.seen``            :class:`MemberSeen`          :class:`MemberSeenReply`
``member.peer_lost``       :class:`MemberPeerLost`      :class:`MemberPeerLostReply`
``member.overlay_key``     :class:`MemberOverlayKey`    :class:`MemberOverlayKeyReply`
``member.overlay_cert``    :class:`MemberOverlayCert`   :class:`MemberOverlayCertReply`
``member.overlay_blocklist`` :class:`MemberOverlayBlocklist` :class:`MemberOverlayBlocklistReply`
``challenge.start``        :class:`ChallengeStart`      :class:`ChallengeAccepted`
``challenge.nonce``        :class:`ChallengeNonce`      :class:`NonceTaken`
``challenge.open``         :class:`ChallengeOpen`       ``OpeningsResponse`` (core)
``challenge.abort``        :class:`ChallengeAbort`      :class:`ChallengeAborted`
=========================  ===========================  ==================================

How to add a command (e.g. ``overlay.renew``):

1. Here: a reply model (subclass :class:`Reply`) and a command model subclassing
   ``AgentCommand[YourReply]`` with ``wire_name: ClassVar[str] = "overlay.renew"`` and
   ``reply_model: ClassVar[type[BaseModel]] = YourReply``; add the class to
   :data:`COMMANDS`' tuple below. New fields of an existing command get defaults, so an
   older peer that omits them still parses (and one that does not know them ignores them).
2. Coordinator: a typed method on ``loom.coordinator.agent_client.AgentClient`` that
   calls ``self.call(node_id, YourCommand(...), timeout=...)`` (or ``self.notify``).
3. Agent: a handler ``async def renew(self, cmd: YourCommand) -> YourReply`` registered
   with ``loom.agent.main.handler(YourCommand, self.renew)``.
4. A round-trip case in ``tests/protocol/test_commands.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loom.core.challenge import (
    ChallengeSpec,
    NonceRelease,
    OpeningRequest,
    OpeningsRequest,
    OpeningsResponse,
)
from loom.core.challenge import ChallengeStart as ChallengeStartMessage
from loom.core.challenge.messages import ChallengeIdBytes, NonceBytes, RoundIndex
from loom.protocol.overlay import (
    MAX_BLOCKLIST,
    OverlayGrant,
    check_fingerprints,
    check_pem,
    check_public_key,
)

R = TypeVar("R", bound=BaseModel)

#: Longest id (member, cluster, Ray node) either side accepts in a command.
_ID = 200


class BadCommand(ValueError):
    """A command or reply that does not parse; the message names the field to fix."""


class Reply(BaseModel):
    """Base of the replies (an ack's ``result``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class AgentCommand(BaseModel, Generic[R]):
    """Base of the commands; ``R`` is the reply type (for the type checker)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    wire_name: ClassVar[str]
    reply_model: ClassVar[type[BaseModel]]

    def args_json(self) -> str:
        """The command's ``args`` as JSON text."""
        return self.model_dump_json()


# -- members -----------------------------------------------------------------------------


class MemberStarted(Reply):
    """The member's Ray node is up and registered with the head."""

    ray_node_id: str = Field(default="", max_length=_ID)
    gcs_address: str = Field(default="", max_length=300)
    dashboard_url: str = Field(default="", max_length=300)
    client_address: str = Field(default="", max_length=300)
    node_ip: str = Field(default="", max_length=100)
    #: The agent's ``time.time()`` when the command arrived (same clock only on one host).
    received_at: float | None = None


class MemberStart(AgentCommand[MemberStarted]):
    """Start one cluster member's Ray node; acked once the node is registered."""

    wire_name: ClassVar[str] = "member.start"
    reply_model: ClassVar[type[BaseModel]] = MemberStarted

    cluster_id: str = Field(min_length=1, max_length=_ID)
    member_id: str = Field(min_length=1, max_length=_ID)
    role: Literal["head", "worker"]
    token: str = Field(max_length=1024)
    head_address: str | None = Field(default=None, max_length=300)
    num_cpus: int = Field(default=1, ge=1, le=100_000)
    gpu_indices: list[int] = Field(default_factory=list, max_length=1024)
    env: dict[str, str] = Field(default_factory=dict)
    #: The member's place on the cluster's Nebula overlay (None: no overlay).
    overlay: OverlayGrant | None = None


class MemberStopped(Reply):
    stopped: bool = False


class MemberStop(AgentCommand[MemberStopped]):
    """Stop a member's whole process tree and remove its files (a no-op if unknown)."""

    wire_name: ClassVar[str] = "member.stop"
    reply_model: ClassVar[type[BaseModel]] = MemberStopped

    member_id: str = Field(min_length=1, max_length=_ID)


class MemberSynced(Reply):
    stopped: list[str] = Field(default_factory=list)
    running: list[str] = Field(default_factory=list)


class MemberSync(AgentCommand[MemberSynced]):
    """The members this node should run; the agent stops every other one."""

    wire_name: ClassVar[str] = "member.sync"
    reply_model: ClassVar[type[BaseModel]] = MemberSynced

    members: list[str] = Field(default_factory=list)


class MemberSeenReply(Reply):
    alive: list[str] = Field(default_factory=list, max_length=10_000)


class MemberSeen(AgentCommand[MemberSeenReply]):
    """Which Ray nodes the head's GCS lists ALIVE, as this member's node sees them."""

    wire_name: ClassVar[str] = "member.seen"
    reply_model: ClassVar[type[BaseModel]] = MemberSeenReply

    member_id: str = Field(min_length=1, max_length=_ID)


class MemberPeerLostReply(Reply):
    """What the head's GCS did: ``dead`` once it lists the node DEAD (``was``: alive, dead
    or absent before the command), else ``unreachable``/``unauthenticated``/``error``."""

    status: str = Field(default="", max_length=40)
    was: str = Field(default="", max_length=40)
    took_s: float | None = None
    error: str = Field(default="", max_length=400)
    #: The lost node's address, and whether the head's connections to it were reset.
    node_ip: str = Field(default="", max_length=100)
    reset: bool = False


class MemberPeerLost(AgentCommand[MemberPeerLostReply]):
    """To the *head* member's agent: Loom declared another member lost; make the head's
    GCS mark that member's Ray node dead now (``loom.agent.ray_peer``), so that tasks and
    actors on it fail over at once instead of after Ray's own health checks."""

    wire_name: ClassVar[str] = "member.peer_lost"
    reply_model: ClassVar[type[BaseModel]] = MemberPeerLostReply

    #: The head member (on the agent this command goes to).
    member_id: str = Field(min_length=1, max_length=_ID)
    #: The lost member's Ray node id (hex).
    ray_node_id: str = Field(pattern=r"^[0-9a-fA-F]{1,200}$")
    reason: str = Field(default="", max_length=300)


# -- the overlay (loom.protocol.overlay: keys stay where they are generated) ---------------


class MemberOverlayKeyReply(Reply):
    """The member's Nebula public key; "" when this agent cannot join overlays (no
    namespaces or no Nebula: its members use the agent's address, and get no grant)."""

    public_key: str = Field(default="", max_length=1024)

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return value if value == "" else check_public_key(value)


class MemberOverlayKey(AgentCommand[MemberOverlayKeyReply]):
    """Generate (or return) the member's Nebula keypair; sent before ``member.start``."""

    wire_name: ClassVar[str] = "member.overlay_key"
    reply_model: ClassVar[type[BaseModel]] = MemberOverlayKeyReply

    cluster_id: str = Field(min_length=1, max_length=_ID)
    member_id: str = Field(min_length=1, max_length=_ID)


class MemberOverlayCertReply(Reply):
    #: Whether the member's Nebula took the new certificate (False: no such member here).
    reloaded: bool = False


class MemberOverlayCert(AgentCommand[MemberOverlayCertReply]):
    """A renewed certificate (same key, address, group): swap it in and reload Nebula."""

    wire_name: ClassVar[str] = "member.overlay_cert"
    reply_model: ClassVar[type[BaseModel]] = MemberOverlayCertReply

    member_id: str = Field(min_length=1, max_length=_ID)
    crt: str = Field(max_length=8192)
    expires_at: float

    @field_validator("crt")
    @classmethod
    def _crt(cls, value: str) -> str:
        return check_pem(value)


class MemberOverlayBlocklistReply(Reply):
    #: The members of that cluster on this agent whose Nebula reloaded the blocklist.
    reloaded: list[str] = Field(default_factory=list, max_length=256)


class MemberOverlayBlocklist(AgentCommand[MemberOverlayBlocklistReply]):
    """The cluster's revoked certificates, in full: every member of ``cluster_id`` on this
    agent writes them as Nebula's ``pki.blocklist`` and reloads (SIGHUP)."""

    wire_name: ClassVar[str] = "member.overlay_blocklist"
    reply_model: ClassVar[type[BaseModel]] = MemberOverlayBlocklistReply

    cluster_id: str = Field(min_length=1, max_length=_ID)
    fingerprints: list[str] = Field(max_length=MAX_BLOCKLIST)

    @field_validator("fingerprints")
    @classmethod
    def _fingerprints(cls, value: list[str]) -> list[str]:
        return check_fingerprints(value)


# -- hardware challenges -------------------------------------------------------------------


class ChallengeAccepted(Reply):
    backend: str = ""
    device: str = ""


class ChallengeStart(AgentCommand[ChallengeAccepted]):
    """Start proving: the spec and the first nonces (fields of the core ChallengeStart)."""

    wire_name: ClassVar[str] = "challenge.start"
    reply_model: ClassVar[type[BaseModel]] = ChallengeAccepted

    spec: ChallengeSpec
    nonces: list[NonceRelease]

    @classmethod
    def of(cls, message: ChallengeStartMessage) -> ChallengeStart:
        return cls(spec=message.spec, nonces=message.nonces)

    def message(self) -> ChallengeStartMessage:
        return ChallengeStartMessage(spec=self.spec, nonces=self.nonces)


class NonceTaken(Reply):
    known: bool = False


class ChallengeNonce(AgentCommand[NonceTaken]):
    """The nonce that starts one round (fields of the core NonceRelease); not awaited."""

    wire_name: ClassVar[str] = "challenge.nonce"
    reply_model: ClassVar[type[BaseModel]] = NonceTaken

    challenge_id: ChallengeIdBytes
    round: RoundIndex
    nonce: NonceBytes

    @classmethod
    def of(cls, release: NonceRelease) -> ChallengeNonce:
        return cls(challenge_id=release.challenge_id, round=release.round, nonce=release.nonce)

    def message(self) -> NonceRelease:
        return NonceRelease(challenge_id=self.challenge_id, round=self.round, nonce=self.nonce)


class ChallengeOpen(AgentCommand[OpeningsResponse]):
    """Open these tiles (fields of the core OpeningsRequest); the reply carries them."""

    wire_name: ClassVar[str] = "challenge.open"
    reply_model: ClassVar[type[BaseModel]] = OpeningsResponse

    challenge_id: ChallengeIdBytes
    openings: list[OpeningRequest]

    @classmethod
    def of(cls, request: OpeningsRequest) -> ChallengeOpen:
        return cls(challenge_id=request.challenge_id, openings=request.openings)

    def message(self) -> OpeningsRequest:
        return OpeningsRequest(challenge_id=self.challenge_id, openings=self.openings)


class ChallengeAborted(Reply):
    dropped: bool = False


class ChallengeAbort(AgentCommand[ChallengeAborted]):
    """Drop a challenge (the end, either way); not awaited."""

    wire_name: ClassVar[str] = "challenge.abort"
    reply_model: ClassVar[type[BaseModel]] = ChallengeAborted

    challenge_id: ChallengeIdBytes


# -- the registry ---------------------------------------------------------------------------

#: Wire name → command model; each model's ``reply_model`` is its reply.
COMMANDS: dict[str, type[AgentCommand[Any]]] = {
    c.wire_name: c
    for c in (
        MemberStart,
        MemberStop,
        MemberSync,
        MemberSeen,
        MemberPeerLost,
        MemberOverlayKey,
        MemberOverlayCert,
        MemberOverlayBlocklist,
        ChallengeStart,
        ChallengeNonce,
        ChallengeOpen,
        ChallengeAbort,
    )
}


def _explain(where: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}.{field}: {first.get('msg')}{more}" if field else f"{where}: {first.get('msg')}"


C = TypeVar("C", bound=AgentCommand[Any])


def parse_as(model: type[C], args: dict[str, Any]) -> C:
    """``args`` as a ``model`` command; :class:`BadCommand` names the field to fix."""
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise BadCommand(_explain(f"{model.wire_name} args", exc)) from None


def parse_command(name: str, args: dict[str, Any]) -> AgentCommand[Any]:
    """The typed command for a received ``Command``; :class:`BadCommand` says what is wrong."""
    model = COMMANDS.get(name)
    if model is None:
        raise BadCommand(f"unknown command {name!r}")
    return parse_as(model, args)


def parse_reply(command: AgentCommand[R], result: dict[str, Any]) -> R:
    """The typed reply to ``command`` from an ack's ``result``; :class:`BadCommand` if not."""
    try:
        reply = command.reply_model.model_validate(result)
    except ValidationError as exc:
        raise BadCommand(_explain(f"{command.wire_name} reply", exc)) from None
    return cast(R, reply)  # reply_model is R by construction
