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
