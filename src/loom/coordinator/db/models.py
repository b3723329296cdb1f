"""SQLAlchemy models: the coordinator's tables.

Timestamps are unix seconds as floats (portable across SQLite and PostgreSQL); money is
integer micro-credits; JSON blobs are text written by pydantic (never pickle) and read
leniently.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Account(Base):
    """A public key that has talked to Loom. An unknown key is simply a new account."""

    __tablename__ = "accounts"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class RequestNonce(Base):
    """Nonces seen in signed requests, kept until their timestamp is out of the skew window."""

    __tablename__ = "request_nonces"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    node_key: Mapped[str] = mapped_column(String(64), unique=True)
    owner_key: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128))
    region: Mapped[str] = mapped_column(String(32))
    country: Mapped[str] = mapped_column(String(2), default="")
    price_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    price_auto: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_changed_at: Mapped[float] = mapped_column(Float)
    registered_at: Mapped[float] = mapped_column(Float)
    connected_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeats: Mapped[int] = mapped_column(BigInteger, default=0)
    protocol: Mapped[int] = mapped_column(Integer, default=0)
    agent_version: Mapped[str] = mapped_column(String(32), default="")
    hostname: Mapped[str] = mapped_column(String(255), default="")
    os: Mapped[str] = mapped_column(String(255), default="")
    cpu_model: Mapped[str] = mapped_column(String(255), default="")
    cpu_cores: Mapped[int] = mapped_column(Integer, default=0)
    ram_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_free_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    inventory_json: Mapped[str] = mapped_column(Text, default="{}")
    load_json: Mapped[str] = mapped_column(Text, default="{}")


class Device(Base):
    """One GPU, or a node's CPU. What the agent claims is never what Loom sells."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    model: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255), default="")
    idx: Mapped[int | None] = mapped_column(Integer, nullable=True)
    count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    vram_mb: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    uuid: Mapped[str] = mapped_column(String(128), default="")
    declared: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16))
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Units held by cluster members (GPU: 0 or 1; CPU: cores). Changed only by conditional
    #: UPDATEs, so two requests can never allocate the same unit.
    allocated_units: Mapped[int] = mapped_column(Integer, default=0)
    #: Units the hardware challenge measured (a CPU: cores of parallel throughput); what
    #: is offered is at most this, whatever ``count`` claims. None: not measured yet.
    verified_units: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The challenger's lease on this device (loom.coordinator.leases; migration 0008).
    lock_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lock_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lock_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_devices_model_state", "model", "state"),)


class NodeEvent(Base):
    """The node's state timeline: every transition with its reason."""

    __tablename__ = "node_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    at: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(255), default="")


class Cluster(Base):
    __tablename__ = "clusters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    owner_key: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    spec_json: Mapped[str] = mapped_column(Text)
    ray_token: Mapped[str] = mapped_column(String(128))
    head_address: Mapped[str] = mapped_column(String(255), default="")
    dashboard_url: Mapped[str] = mapped_column(String(255), default="")
    client_address: Mapped[str] = mapped_column(String(255), default="")
    hourly_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    ready_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expires_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    state_changed_at: Mapped[float] = mapped_column(Float)
    timings_json: Mapped[str] = mapped_column(Text, default="{}")
    #: Set on the way to `terminating` when the cluster is to end `failed` (with this reason).
    fail_reason: Mapped[str] = mapped_column(Text, default="")
    #: The reconciler's lease on this cluster (loom.coordinator.leases; migration 0008).
    lock_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lock_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lock_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Member(Base):
    """One node's share of a cluster."""

    __tablename__ = "members"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cluster_id: Mapped[str] = mapped_column(
        ForeignKey("clusters.id", ondelete="CASCADE"), index=True
    )
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    role: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str] = mapped_column(String(64))
    units: Mapped[int] = mapped_column(Integer)
    gpu_indices: Mapped[str] = mapped_column(String(128), default="")
    price_micro: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    ready_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ray_node_id: Mapped[str] = mapped_column(String(64), default="")
    #: Confirmed time (loom.core.metering.Confirmation): only this is billed.
    confirmed_s: Mapped[float] = mapped_column(Float, default=0.0)
    confirmed_last: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Who confirmed it last, or why it is not confirmed (shown in the cluster's status).
    confirm_note: Mapped[str] = mapped_column(Text, default="")


class Allocation(Base):
    """Units of a device held by a member (a GPU: 1; a CPU: cores)."""

    __tablename__ = "allocations"

    member_id: Mapped[str] = mapped_column(
        ForeignKey("members.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    units: Mapped[int] = mapped_column(Integer)


class ClusterEvent(Base):
    __tablename__ = "cluster_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cluster_id: Mapped[str] = mapped_column(
        ForeignKey("clusters.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")


# --------------------------------------------------------------------------- money plane
# (issue 4; migration 0003). The ledger rules live in loom.core.ledger; these rows store
# what it seals. `ledger_head` is the single row every poster locks first.


class LedgerTransaction(Base):
    __tablename__ = "ledger_transactions"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    #: unix microseconds
    created_at: Mapped[int] = mapped_column(BigInteger)
    meta_json: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"

    txn_seq: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("ledger_transactions.seq"), primary_key=True
    )
    account: Mapped[str] = mapped_column(String(100), primary_key=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_ledger_entries_account", "account", "txn_seq"),)


class AccountBalance(Base):
    """Materialized balances, updated in the same DB transaction as the entries."""

    __tablename__ = "account_balances"

    account: Mapped[str] = mapped_column(String(100), primary_key=True)
    balance_micro: Mapped[int] = mapped_column(BigInteger, default=0)


class LedgerHead(Base):
    """One row (id 1): the chain's last seq and hash. Posters lock it first."""

    __tablename__ = "ledger_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))


class MemberMeter(Base):
    """Metering state of one member: how far healthy time was accrued, and what settled."""

    __tablename__ = "member_meters"

    member_id: Mapped[str] = mapped_column(
        ForeignKey("members.id", ondelete="CASCADE"), primary_key=True
    )
    cluster_id: Mapped[str] = mapped_column(String(32), index=True)
    supplier_key: Mapped[str] = mapped_column(String(64), index=True)
    metered_until: Mapped[float] = mapped_column(Float)
    carry: Mapped[int] = mapped_column(Integer, default=0)
    #: whole micro-credits accrued so far (gross)
    accrued_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    #: gross taken out of escrow so far, and the part of it paid to the supplier
    settled_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    paid_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    #: accrued but never covered (the escrow ran dry); written off at close
    written_off_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    closed: Mapped[bool] = mapped_column(Boolean, default=False)
    #: whole confirmed seconds accrued so far (Member.confirmed_s is the source)
    billed_s: Mapped[int] = mapped_column(BigInteger, default=0)


class LedgerAlias(Base):
    """The pseudonym under which a private account appears in the public ledger.

    ``user:<key>`` and ``escrow:<cluster>`` get a random alias the first time money moves
    (``user:<64 random hex>``, ``escrow:e<24 random hex>``); accounts that existed before
    pseudonyms map to themselves. The row ``secret:keys`` holds the key under which
    idempotency keys are hashed before they enter the chain. Never served publicly.
    """

    __tablename__ = "ledger_aliases"

    account: Mapped[str] = mapped_column(String(80), primary_key=True)
    alias: Mapped[str] = mapped_column(String(80), unique=True)


# --------------------------------------------------------------------------- verification
# (issue 5; migration 0004). Every hardware challenge's outcome, and fraud evidence.


class DeviceChallenge(Base):
    """One hardware challenge of one device, with the figures behind its verdict.

    ``outcome``: passed | failed | error (transport trouble, e.g. the agent disconnected:
    not held against the device) | interrupted (the device got work mid re-challenge).
    """

    __tablename__ = "device_challenges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    challenge_id: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(String(64))
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    device_class: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(16), default="initial")
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float] = mapped_column(Float)
    #: seconds on the coordinator's monotonic clock from start to verdict
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(String(16))
    passed: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")
    measured_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    required_rate: Mapped[float] = mapped_column(Float, default=0.0)
    openings_checked: Mapped[int] = mapped_column(Integer, default=0)
    openings_failed: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_device_challenges_device", "device_id", "started_at"),
        Index("ix_device_challenges_node", "node_id", "started_at"),
    )


class ChallengeEvidence(Base):
    """A wrong tile digest under a root the node signed: re-checkable offline by anyone."""

    __tablename__ = "challenge_evidence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    challenge_id: Mapped[str] = mapped_column(String(64), index=True)
    node_id: Mapped[str] = mapped_column(String(32), index=True)
    device_id: Mapped[str] = mapped_column(String(64))
    node_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    #: the Evidence JSON exactly as `loom evidence verify` reads it
    evidence_json: Mapped[str] = mapped_column(Text)


# --------------------------------------------------------------------------- explorer
# (issue 7; migration 0005). What the explorer's 24 h utilization chart is drawn from.


class UtilizationSample(Base):
    """The network's supply and use at one moment (written every minute, kept 7 days).

    Supply counts present devices of online nodes (``available`` or ``allocated``): GPUs
    one unit each, CPUs by core.
    """

    __tablename__ = "utilization_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    nodes_online: Mapped[int] = mapped_column(Integer, default=0)
    gpu_total: Mapped[int] = mapped_column(Integer, default=0)
    gpu_allocated: Mapped[int] = mapped_column(Integer, default=0)
    cpu_total: Mapped[int] = mapped_column(Integer, default=0)
    cpu_allocated: Mapped[int] = mapped_column(Integer, default=0)
    heartbeats_per_s: Mapped[float] = mapped_column(Float, default=0.0)


# --------------------------------------------------------------------------- leases
# (issue 11; migration 0008). Which replica does which work (loom.coordinator.leases).


class RoleLease(Base):
    """A named role one replica holds at a time (the settler, the ledger sequencer...)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), default="")
    token: Mapped[str] = mapped_column(String(64), default="")
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)


class LeaseAudit(Base):
    """One action applied under a lease, written in the apply's own transaction."""

    __tablename__ = "lease_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    item_id: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str] = mapped_column(String(128))
    token: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Float, index=True)

    __table_args__ = (Index("ix_lease_audit_item", "kind", "item_id"),)


# --------------------------------------------------------------------------- agent sessions
# (issue 11 §3; migration 0009). Which replica holds each agent's WebSocket
# (loom.coordinator.replicas.sessions).


class AgentSession(Base):
    """The replica holding ``node_id``'s socket, fenced by ``epoch`` (bumped per connect)."""

    __tablename__ = "agent_sessions"

    node_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(128), index=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=1)
    connected_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    #: Where other replicas reach the holder (its advertised HTTP URL), for operators.
    address: Mapped[str] = mapped_column(String(255), default="")


# --------------------------------------------------------------------------- ledger hand-off
# (issue 11 §6; migration 0010). Transfers a replica without the sequencer role hands to
# the holder (loom.coordinator.services.ledger_queue).


class LedgerQueued(Base):
    """One handed-over transfer: pending, then answered (sealed seq, or the refusal)."""

    __tablename__ = "ledger_queue"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    submitted_by: Mapped[str] = mapped_column(String(128))
    submitted_at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))
    #: the caller's own (private) idempotency key; the row is deleted once answered
    idem_key: Mapped[str] = mapped_column(Text)
    entries_json: Mapped[str] = mapped_column(Text)
    meta_json: Mapped[str] = mapped_column(Text)
    #: pending | sealed | refused
    state: Mapped[str] = mapped_column(String(8), default="pending")
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    answered_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_ledger_queue_state", "state", "id"),)


# --------------------------------------------------------------------------- overlay book
# (issue 10 with issue 11; migration 0011). The Nebula overlay's address book, signed
# certificates, revocations and lighthouses, shared by every replica
# (loom.coordinator.overlay.book). The CA's key is not here: it is a file on each replica.


class OverlayCA(Base):
    """The network's overlay CA certificate (public): every replica must sign with it."""

    __tablename__ = "overlay_ca"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ca_crt: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[float] = mapped_column(Float, default=0.0)


class OverlayHolder(Base):
    """A certificate holder (a member, or a user's ``cluster connect``) and its address."""

    __tablename__ = "overlay_holders"

    holder: Mapped[str] = mapped_column(String(64), primary_key=True)
    cluster_id: Mapped[str] = mapped_column(String(64), index=True)
    ip: Mapped[str] = mapped_column(String(15), unique=True)
    #: The holder's public key PEM ("" until a certificate was signed for it).
    pub: Mapped[str] = mapped_column(Text, default="")
    #: The certificate it uses now: when it expires, and how long it was signed for.
    expires: Mapped[float] = mapped_column(Float, default=0.0)
    lifetime: Mapped[float] = mapped_column(Float, default=0.0)
    #: Whether its agent reported every tunnel going through a relay (None: not known).
    relayed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class OverlayCert(Base):
    """A certificate signed for a holder; ``revoked_at`` set once it is blocked."""

    __tablename__ = "overlay_certs"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), index=True)
    cluster_id: Mapped[str] = mapped_column(String(64), index=True)
    ip: Mapped[str] = mapped_column(String(15))
    expires: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_overlay_certs_revoked", "revoked_at", "expires"),)


class OverlayLighthouse(Base):
    """One replica's lighthouse + relay: its overlay address (a reserved slot) and where
    members send UDP to it. Keyed by that advertised address, so a coordinator restarted
    on the same address keeps its slot (and its members' configs stay right)."""

    __tablename__ = "overlay_lighthouses"

    addresses: Mapped[str] = mapped_column(String(255), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, unique=True)
    ip: Mapped[str] = mapped_column(String(15))
    replica_id: Mapped[str] = mapped_column(String(128), default="")
    seen_at: Mapped[float] = mapped_column(Float, default=0.0)
