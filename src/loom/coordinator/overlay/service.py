"""The overlay as the rest of the coordinator sees it.

``install(state)`` at start-up (when ``--overlay-listen`` is given), ``grant_args`` for
every ``member.start`` (asks the agent for the member's public key first), ``renew_step``
on a loop (fresh certificates for the members of live clusters, pushed to their agents),
``release`` when a cluster ends, ``revoke`` when a member leaves a live cluster,
``annotate`` for the status. With the overlay off every call is a no-op and members use
the agents' addresses.

Revocation: a holder that leaves (a member lost, failed or stopped; every member and user
certificate when the cluster ends) has all its unexpired certificates' fingerprints put on
the cluster's blocklist; the lighthouse reloads the whole list at once and every remaining
member's agent gets the cluster's full list (``member.overlay_blocklist``). The same loop
as the renewal (``revoke_step``) catches removals made elsewhere (a member marked lost by
the watchdog, a restart between the row and the push) and pushes again to agents that
missed the list.

With replicas: the book is in the database (:mod:`loom.coordinator.overlay.book`) and
every replica holds the same CA, so any replica signs, shows and revokes. Each replica
running the overlay runs its own lighthouse (a slot of its own) and keeps its blocklist
current from the database (``lighthouse_step``, every :data:`LIGHTHOUSE_CHECK_S`); the
renewal and the catch-up push run on the replica holding the ``overlay`` role.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from loom.coordinator import leases
from loom.coordinator.config import Settings
from loom.coordinator.db.models import Cluster, Member
from loom.coordinator.hub import AgentNotConnected, CommandFailed
from loom.coordinator.overlay.authority import (
    Authority,
    OverlayConfigError,
    OverlaySettings,
    fingerprint,
    nebula_cert,
)
from loom.coordinator.overlay.book import (
    Book,
    GrantRefused,
    ca_mismatch,
    ca_missing,
    network_ca,
)
from loom.coordinator.overlay.legacy import import_files
from loom.coordinator.overlay.lighthouse import Lighthouse, nebula_binary
from loom.core.models import ClusterState, MemberState
from loom.protocol.api import ClusterOut
from loom.protocol.commands import MemberOverlayBlocklist, MemberOverlayCert, MemberStart
from loom.protocol.messages import Report

log = logging.getLogger(__name__)

#: How long an agent may take to generate a key / swap a certificate.
KEY_TIMEOUT_S = 30.0
#: Clusters whose members keep getting certificates.
LIVE_CLUSTERS = (
    ClusterState.REQUESTED.value,
    ClusterState.PROVISIONING.value,
    ClusterState.RUNNING.value,
    ClusterState.HEALING.value,
)
LIVE_MEMBERS = (MemberState.ASSIGNED.value, MemberState.STARTING.value, MemberState.READY.value)
#: The role whose holder renews certificates and pushes blocklists agents missed.
ROLE = "overlay"
#: How often every replica checks its lighthouse's blocklist against the database.
LIGHTHOUSE_CHECK_S = 2.0


@dataclass
class Overlay:
    authority: Authority
    book: Book
    lighthouse: Lighthouse
    #: where members send this replica's lighthouse UDP (its row in the book)
    advertised: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    #: (node id, cluster id) -> the blocklist that node's agent last confirmed
    pushed: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    #: the blocklist this replica's lighthouse last confirmed
    lighthouse_list: tuple[str, ...] = ()
    #: (node id, cluster id) whose blocklist push failed here: retried every
    #: LIGHTHOUSE_CHECK_S (``retry_step``) until the agent confirms
    retry: set[tuple[str, str]] = field(default_factory=set)


def overlay_settings(settings: Settings) -> OverlaySettings | None:
    """The overlay options, or None when the overlay is off (no ``--overlay-listen``)."""
    if not settings.overlay_listen:
        return None
    data_dir = Path(settings.overlay_dir) if settings.overlay_dir else None
    if data_dir is None:
        from loom.protocol.keystore import loom_home

        data_dir = loom_home() / "overlay"
    return OverlaySettings(
        listen=settings.overlay_listen,
        advertise=settings.overlay_advertise,
        network=settings.overlay_network,
        data_dir=data_dir,
        cert_lifetime_s=settings.overlay_cert_lifetime_s,
    )


def renew_interval(settings: OverlaySettings) -> float:
    """How often the renewal step runs: often enough for the shortest lifetime."""
    return max(0.5, min(60.0, settings.cert_lifetime_s / 12))


async def install(state: Any) -> Overlay | None:
    """Create the CA (first replica, first time) or check it is the network's, claim a
    lighthouse slot, start and supervise the lighthouse; sets state.overlay."""
    config = overlay_settings(state.settings)
    if config is None:
        return None
    replica_id = state.settings.replica_id
    known = await network_ca(state.session)
    try:
        authority = await asyncio.to_thread(Authority, config, create=known is None)
    except OverlayConfigError:
        assert known is not None
        raise OverlayConfigError(ca_missing(known.created_by, config.data_dir)) from None
    book = Book(authority, state.session)
    await book.register_ca(replica_id)
    await import_files(book)
    advertised = config.advertised()
    slot = await book.claim_lighthouse(advertised, replica_id)
    lighthouse = Lighthouse(authority, slot.slot)
    lighthouse.blocklist = await book.blocklist()
    await lighthouse.start()
    overlay = Overlay(authority, book, lighthouse, advertised)
    overlay.lighthouse_list = tuple(lighthouse.blocklist)
    overlay.task = asyncio.create_task(lighthouse.run(), name="overlay-lighthouse")
    state.tasks.append(overlay.task)
    state.overlay = overlay

    async def on_overlay_report(_node_id: str, report: Report, _at: float) -> None:
        member_id = str(report.data.get("member_id", ""))
        if member_id:
            await book.set_relayed(member_id, bool(report.data.get("relayed")))

    state.hub.on_report("member.overlay", on_overlay_report)

    async def renewal() -> None:
        if await holds_role(state):
            await revoke_step(state)
            await renew_step(state)

    async def lighthouse_check() -> None:
        await lighthouse_step(state)
        await retry_step(state)

    state.spawn_loop("overlay-renewal", renew_interval(config), renewal)
    state.spawn_loop("overlay-lighthouse-check", LIGHTHOUSE_CHECK_S, lighthouse_check)
    return overlay


async def holds_role(state: Any, now: float | None = None) -> bool:
    """Whether this replica holds the ``overlay`` role (renewal and catch-up) now."""
    config = overlay_settings(state.settings)
    if config is None:
        return False
    now = time.time() if now is None else now
    ttl = max(30.0, 3 * renew_interval(config))
    async with state.session() as session:
        lease = await leases.claim_role(session, ROLE, state.settings.replica_id, now, ttl)
        await session.commit()
    return lease is not None


async def lighthouse_step(state: Any, now: float | None = None) -> bool:
    """Keep this replica's lighthouse listed (its row seen) and its blocklist the
    network's; returns whether it reloaded."""
    overlay = current(state)
    if overlay is None:
        return False
    now = time.time() if now is None else now
    await overlay.book.touch_lighthouse(overlay.advertised, now)
    everything = tuple(await overlay.book.blocklist(None, now))
    if everything != overlay.lighthouse_list and await overlay.lighthouse.reload(list(everything)):
        overlay.lighthouse_list = everything
        return True
    return False


def current(state: Any) -> Overlay | None:
    """The running overlay of this coordinator, or None."""
    overlay = getattr(state, "overlay", None)
    return overlay if isinstance(overlay, Overlay) else None


async def grant_args(
    state: Any,
    command: MemberStart,
    cluster_id: str,
    member_id: str,
    ends_at: float | None,
    node_id: str | None = None,
) -> MemberStart:
    """``member.start`` with the member's overlay grant (unchanged when off).

    Asks the member's agent for its public key first (``member.overlay_key``): the agent
    generates the keypair and keeps the private key. An agent that cannot join overlays
    answers no key and gets no grant. Raises AgentNotConnected / CommandFailed.
    """
    overlay = current(state)
    if overlay is None:
        return command
    if node_id is None:
        async with state.session() as session:
            member = await session.get(Member, member_id)
            if member is None:
                raise CommandFailed(f"member {member_id} is gone")
            node_id = member.node_id
    key = await state.agents.member_overlay_key(
        node_id, cluster_id, member_id, timeout=KEY_TIMEOUT_S
    )
    if not key.public_key:
        return command
    try:
        grant = await overlay.book.grant(cluster_id, member_id, ends_at, key.public_key)
    except GrantRefused as exc:
        raise CommandFailed(str(exc)) from None
    return command.model_copy(update={"overlay": grant})


async def renew_step(state: Any, now: float | None = None) -> list[str]:
    """Renew the certificates that are due, for members of live clusters; push each one.

    Returns the member ids whose agent took a renewed certificate. A member of a cluster
    that ended (or a member that ended) gets none; its address is released if its cluster
    is over. A user certificate (``cluster connect``) is not renewed here: connect asks itself.
    """
    overlay = current(state)
    if overlay is None:
        return []
    now = time.time() if now is None else now
    book = overlay.book
    due = await book.due(now)
    if not due:
        return []
    async with state.session() as session:
        rows = (
            await session.execute(
                select(
                    Member.id,
                    Member.node_id,
                    Member.state,
                    Cluster.id,
                    Cluster.state,
                    Cluster.expires_at,
                )
                .join(Cluster, Cluster.id == Member.cluster_id)
                .where(Member.id.in_(due))
            )
        ).all()
    renewed: list[str] = []
    for member_id, node_id, member_state, cluster_id, cluster_state, ends_at in rows:
        if cluster_state not in LIVE_CLUSTERS:
            await release(state, cluster_id)  # missed at teardown (a restart): revoke now
            continue
        if member_state not in LIVE_MEMBERS:
            continue
        renewal = await book.renew(member_id, ends_at, now)
        if renewal is None:
            continue
        command = MemberOverlayCert(
            member_id=member_id, crt=renewal.crt, expires_at=renewal.expires_at
        )
        try:
            reply = await state.agents.member_overlay_cert(node_id, command, timeout=KEY_TIMEOUT_S)
        except (AgentNotConnected, CommandFailed) as exc:
            log.warning("overlay: pushing %s's renewed certificate failed: %s", member_id, exc)
            continue
        if reply.reloaded:
            await book.renewed(renewal, now)
            renewed.append(member_id)
    return renewed


async def release(state: Any, cluster_id: str, now: float | None = None) -> None:
    """A cluster ended: revoke its members' and users' certificates, free their addresses.

    Its members were stopped (or are unreachable: their Nebula may live on); the
    lighthouse blocks them, so none can be answered or relayed to anyone.
    """
    overlay = current(state)
    if overlay is None:
        return
    gone = await overlay.book.release_cluster(cluster_id, now)
    if gone:
        await push_blocklist(state, cluster_id, now)


async def revoke(
    state: Any, cluster_id: str, holders: list[str], now: float | None = None
) -> list[str]:
    """Members (or user certificates) that left a cluster: block their certificates now.

    Returns the fingerprints newly blocked. The lighthouse and every remaining member of
    the cluster reload the blocklist before this returns (each agent within its timeout).
    """
    overlay = current(state)
    if overlay is None or not holders:
        return []
    added = await overlay.book.revoke(holders, now)
    if added:
        log.info("overlay: revoked %d certificate(s) of %s", len(added), ", ".join(holders))
        await push_blocklist(state, cluster_id, now)
    return added


async def revoke_ended(state: Any, cluster_id: str, now: float | None = None) -> list[str]:
    """Revoke the cluster's members that are no longer live (lost, released); see revoke.

    User certificates (no member row) stay until the cluster ends.
    """
    overlay = current(state)
    if overlay is None:
        return []
    holders = await overlay.book.holders(cluster_id)
    if not holders:
        return []
    async with state.session() as session:
        rows = (
            await session.execute(select(Member.id, Member.state).where(Member.id.in_(holders)))
        ).all()
    ended = sorted(m for m, st in rows if st not in LIVE_MEMBERS)
    return await revoke(state, cluster_id, ended, now)


async def push_blocklist(state: Any, cluster_id: str, now: float | None = None) -> list[str]:
    """The cluster's blocklist to this replica's lighthouse and every live member's agent.

    Returns the members whose Nebula confirmed the reload. An agent that is unreachable
    or fails is logged and tried again every :data:`LIGHTHOUSE_CHECK_S` by this replica
    (:func:`retry_step`), and by :func:`revoke_step` on the role holder; the other
    replicas' lighthouses reload within :data:`LIGHTHOUSE_CHECK_S` (``lighthouse_step``).
    """
    overlay = current(state)
    if overlay is None:
        return []
    await lighthouse_step(state, now)
    return await _push_to(state, overlay, cluster_id, await _live_nodes(state, cluster_id), now)


async def _live_nodes(state: Any, cluster_id: str) -> list[str]:
    async with state.session() as session:
        rows = await session.execute(
            select(Member.node_id).where(
                Member.cluster_id == cluster_id, Member.state.in_(LIVE_MEMBERS)
            )
        )
        return sorted(set(rows.scalars()))


async def _push_to(
    state: Any, overlay: Overlay, cluster_id: str, nodes: list[str], now: float | None
) -> list[str]:
    fingerprints = await overlay.book.blocklist(cluster_id, now)
    command = MemberOverlayBlocklist(cluster_id=cluster_id, fingerprints=fingerprints)

    async def one(node_id: str) -> list[str]:
        try:
            reply = await state.agents.member_overlay_blocklist(
                node_id, command, timeout=KEY_TIMEOUT_S
            )
        except (AgentNotConnected, CommandFailed) as exc:
            log.warning("overlay: blocklist of %s to %s failed: %s", cluster_id, node_id, exc)
            overlay.retry.add((node_id, cluster_id))
            return []
        overlay.pushed[(node_id, cluster_id)] = tuple(fingerprints)
        overlay.retry.discard((node_id, cluster_id))
        reloaded: list[str] = reply.reloaded
        return reloaded

    done = await asyncio.gather(*(one(n) for n in nodes))
    return sorted(m for members in done for m in members)


async def retry_step(state: Any, now: float | None = None) -> list[str]:
    """Push again the blocklists agents missed here (unreachable, failed); returns the
    members that reloaded. A pair whose node no longer holds a live member is dropped."""
    overlay = current(state)
    if overlay is None or not overlay.retry:
        return []
    reloaded: list[str] = []
    for cluster_id in sorted({c for _, c in overlay.retry}):
        wanted = {n for n, c in overlay.retry if c == cluster_id}
        live = set(await _live_nodes(state, cluster_id))
        overlay.retry -= {(n, cluster_id) for n in wanted - live}
        if wanted & live:
            reloaded += await _push_to(state, overlay, cluster_id, sorted(wanted & live), now)
    return sorted(reloaded)


async def revoke_step(state: Any, now: float | None = None) -> None:
    """Catch up (two queries a tick): revoke holders of live clusters that left, release
    ended clusters, push each live cluster's blocklist to agents that did not confirm it."""
    overlay = current(state)
    if overlay is None:
        return
    now = time.time() if now is None else now
    registry = overlay.book
    book = await registry.clusters()
    blocked = await registry.blocked_clusters(now)
    wanted = sorted(set(book) | set(blocked))
    if wanted:
        async with state.session() as session:
            states = dict(
                (
                    await session.execute(
                        select(Cluster.id, Cluster.state).where(Cluster.id.in_(wanted))
                    )
                ).all()
            )
            rows = (
                await session.execute(
                    select(Member.id, Member.cluster_id, Member.node_id, Member.state).where(
                        Member.cluster_id.in_(wanted)
                    )
                )
            ).all()
        for cluster_id in book:
            if states.get(cluster_id) not in LIVE_CLUSTERS:
                await release(state, cluster_id, now)
                continue
            holders = set(await registry.holders(cluster_id))
            ended = sorted(
                m
                for m, c, _, st in rows
                if c == cluster_id and m in holders and st not in LIVE_MEMBERS
            )
            await revoke(state, cluster_id, ended, now)
        for cluster_id in blocked:
            if states.get(cluster_id) not in LIVE_CLUSTERS:
                continue
            fingerprints = tuple(await registry.blocklist(cluster_id, now))
            nodes = {n for _, c, n, st in rows if c == cluster_id and st in LIVE_MEMBERS}
            if any(overlay.pushed.get((n, cluster_id)) != fingerprints for n in nodes):
                await push_blocklist(state, cluster_id, now)
    await lighthouse_step(state, now)


def check_overlay(settings: Settings) -> None:
    """Raise OverlayConfigError (a clear message) if the overlay options cannot work."""
    config = overlay_settings(settings)
    if config is None:
        return
    _ = config.net, config.listen_port, config.advertised()
    nebula_cert()
    nebula_binary()
    for item in config.advertised():
        host = item.rpartition(":")[0].strip("[]")
        if host in ("0.0.0.0", "::"):
            raise OverlayConfigError(
                f"--overlay-advertise {item!r}: members need a reachable address, "
                "not a wildcard (give the coordinator's public address)"
            )


async def check_network_ca(settings: Settings) -> None:
    """Before serving: if the network already has an overlay CA (another replica made it),
    this replica's overlay directory must hold the same one; OverlayConfigError says what
    to copy. A database without the table yet (never migrated) has none."""
    config = overlay_settings(settings)
    if config is None:
        return
    from sqlalchemy.exc import DBAPIError

    from loom.coordinator.db.engine import create_engine, session_factory

    engine = create_engine(settings.db_url)
    try:
        try:
            known = await network_ca(session_factory(engine))
        except DBAPIError:  # no overlay_ca table: a database from before, or a new one
            return
    finally:
        await engine.dispose()
    if known is None:
        return
    ca_crt = config.data_dir / "ca.crt"
    if not ca_crt.exists() or not (config.data_dir / "ca.key").exists():
        raise OverlayConfigError(ca_missing(known.created_by, config.data_dir))
    mine = fingerprint(ca_crt.read_text())
    if mine != known.fingerprint:
        raise OverlayConfigError(ca_mismatch(known.fingerprint, known.created_by, ca_crt, mine))


async def annotate(state: Any, out: ClusterOut) -> ClusterOut:
    """The cluster status with each member's overlay address (and relay use, if known)."""
    overlay = current(state)
    if overlay is None:
        return out
    known = await overlay.book.addresses([m.id for m in out.members])
    members = [
        m.model_copy(
            update={
                "overlay_ip": known.get(m.id, ("", None))[0],
                "relayed": known.get(m.id, ("", None))[1],
            }
        )
        for m in out.members
    ]
    return out.model_copy(update={"members": members})
