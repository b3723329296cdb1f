"""Coordinator settings, from the command line or the embedding program."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path


def default_db_url(home: Path) -> str:
    return f"sqlite:///{home / 'coordinator.db'}"


def default_replica_id() -> str:
    """`<hostname>-<pid>`: unique among live replicas, new after every restart."""
    return f"{socket.gethostname()[:100]}-{os.getpid()}"


@dataclass
class Settings:
    db_url: str
    host: str = "127.0.0.1"
    port: int = 8700
    #: A node with no heartbeat for this long becomes `offline`.
    heartbeat_timeout_s: float = 15.0
    #: After a (re)start nobody is judged offline for this long: agents reconnect with a
    #: capped backoff (30 s), so a coordinator outage must not read as node failures.
    restart_grace_s: float = 35.0
    #: What agents are told to use.
    heartbeat_interval_s: float = 5.0
    #: How often buffered heartbeats are written to the database.
    heartbeat_flush_s: float = 1.0
    watchdog_interval_s: float = 1.0
    reconcile_interval_s: float = 2.0
    max_body_bytes: int = 1 << 20
    max_clock_skew_s: int = 60
    #: Mint credits on request (embedded demo); off unless asked for.
    faucet: bool = False
    operator_key_hex: str = ""
    #: Freeze start-up objects out of the cyclic GC and collect less often (a process-wide
    #: setting: off when the coordinator is embedded in another program, e.g. tests).
    tune_gc: bool = True
    #: Only devices that passed the hardware challenge are placeable.
    require_verified: bool = True
    extra: dict[str, str] = field(default_factory=dict)
    #: The Nebula overlay (issue 10): UDP HOST:PORT of the lighthouse ("" = overlay off),
    #: where members reach it (default: the listen address), the overlay's address range,
    #: and where the CA lives (default: $LOOM_HOME/overlay).
    overlay_listen: str = ""
    overlay_advertise: str = ""
    overlay_network: str = "10.250.0.0/16"
    overlay_dir: str = ""
    #: How long a member's overlay certificate lives (renewed while its cluster lives).
    overlay_cert_lifetime_s: float = 4 * 3600.0
    #: How often the settlement loop meters healthy time and settles it (at most 60 s).
    settle_interval_s: float = 30.0
    #: Platform fee on settlements, in basis points (500 = 5 %).
    fee_bps: int = 500
    #: Warn in a cluster's status when its escrow pays for less than this.
    escrow_warn_s: float = 900.0
    #: The bus between coordinator replicas: nats://HOST:PORT[,…] ("" = one process, the
    #: in-process bus; loom.coordinator.replicas). May hold a password: kept out of repr.
    bus_url: str = field(default="", repr=False)
    #: A file with the bus credentials (USER:PASS, TOKEN or a NATS .creds file; "" = none
    #: or in ``bus_url``; loom.coordinator.replicas.link). Never logged, nor its contents.
    bus_creds: str = ""
    #: This replica's name: the owner written on the leases it holds (loom.coordinator.leases).
    replica_id: str = field(default_factory=default_replica_id)
    #: How long a replica's lease on a cluster lasts without renewal (renewed every third
    #: of it while the cluster is worked on): how soon another replica takes over its work.
    cluster_lease_s: float = 30.0
