"""The overlay's book in the database: addresses, certificates, revocations, lighthouses.

Every replica reads and writes the same rows, so any replica signs a member's or a user's
certificate, renews it, revokes it, and shows its address; each replica's lighthouse
reads the network's whole blocklist from here. Signing itself (the CA's key) is the
:class:`~loom.coordinator.overlay.authority.Authority`'s; :class:`Book` puts the two
together. Every call takes ``now`` where time matters, so tests drive it without sleeping.

Addresses: the network's first :data:`LIGHTHOUSE_SLOTS` addresses are the lighthouses'
(one per replica running one, claimed by its advertised address); members and user
certificates get the lowest free address after them. An address whose holder was revoked
is not given out again until every certificate signed for it has expired (a peer's tunnel
to the revoked holder may outlive the revocation by a few seconds). Two replicas
allocating at once both try the same address: the unique index refuses one, which takes
the next.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import OverlayCA, OverlayCert, OverlayHolder, OverlayLighthouse
from loom.coordinator.overlay.authority import (
    LIGHTHOUSE_SLOTS,
    RENEW_AT,
    Authority,
    OverlayConfigError,
    cluster_group,
    fingerprint,
)
from loom.protocol.overlay import LighthouseRef, OverlayGrant, OverlayRenewal

log = logging.getLogger(__name__)

SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]
#: A lighthouse not seen for this long is left out of new grants, and its slot may be
#: taken by another replica.
LIGHTHOUSE_TTL_S = 180.0
#: Attempts at an address or a slot when other replicas take the same ones meanwhile.
ALLOCATE_TRIES = 32


@dataclass(frozen=True)
class Entry:
    """One certificate holder: its cluster, address, public key and current certificate."""

    cluster: str
    ip: str
    #: The holder's public key PEM ("" until a certificate was signed for it).
    pub: str = ""
    expires: float = 0.0
    lifetime: float = 0.0
    #: Every unexpired certificate signed for it: (fingerprint, expiry). The holder keeps
    #: them all (a renewal does not void the previous one), so a revocation blocks them all.
    certs: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Revoked:
    """A blocked certificate: whose it was, and until when it needs blocking."""

    cluster: str
    holder: str
    expires: float
    ip: str = ""


@dataclass(frozen=True)
class LighthouseSlot:
    """A replica's lighthouse: its slot and overlay address."""

    slot: int
    ip: str


class GrantRefused(RuntimeError):
    """The holder was revoked (its cluster ended, it left) while its certificate was signed."""


class Book:
    """The authority's signing over the shared rows; every method opens its own session."""

    def __init__(self, authority: Authority, sessions: SessionFactory) -> None:
        self.authority = authority
        self.sessions = sessions
        self.net = authority.net

    # ----------------------------------------------------------------- the CA and the files

    async def register_ca(self, replica_id: str, now: float | None = None) -> None:
        """Record this CA for the network, or refuse it if the network has another one."""
        now = time.time() if now is None else now
        mine = fingerprint(self.authority.ca_crt)
        async with self.sessions() as session:
            row = await session.get(OverlayCA, 1)
            if row is None:
                session.add(
                    OverlayCA(
                        id=1,
                        ca_crt=self.authority.ca_crt,
                        fingerprint=mine,
                        created_by=replica_id,
                        created_at=now,
                    )
                )
                try:
                    await session.commit()
                    return
                except IntegrityError:  # another replica recorded its CA first
                    await session.rollback()
                row = await session.get(OverlayCA, 1)
            if row is not None and row.fingerprint != mine:
                raise OverlayConfigError(
                    ca_mismatch(row.fingerprint, row.created_by, self.authority.ca_crt_path, mine)
                )

    # ---------------------------------------------------------------------- lighthouses

    async def claim_lighthouse(
        self, addresses: Sequence[str], replica_id: str, now: float | None = None
    ) -> LighthouseSlot:
        """This replica's lighthouse slot, by its advertised addresses (the same one after
        a restart there); a free slot, or one whose lighthouse went silent, otherwise."""
        now = time.time() if now is None else now
        key = ",".join(addresses)
        for _ in range(ALLOCATE_TRIES):
            async with self.sessions() as session:
                row = await session.get(OverlayLighthouse, key)
                if row is not None:
                    row.replica_id, row.seen_at = replica_id, now
                    await session.commit()
                    return LighthouseSlot(row.slot, row.ip)
                rows = (await session.execute(select(OverlayLighthouse))).scalars().all()
                taken = {r.slot for r in rows if r.seen_at > now - LIGHTHOUSE_TTL_S}
                free = [s for s in range(LIGHTHOUSE_SLOTS) if s not in taken]
                if not free:
                    raise OverlayConfigError(
                        f"all {LIGHTHOUSE_SLOTS} lighthouse slots of the overlay are held by "
                        "live replicas: run the overlay on fewer replicas"
                    )
                slot = free[0]
                await session.execute(
                    delete(OverlayLighthouse).where(OverlayLighthouse.slot == slot)
                )
                ip = self.authority.lighthouse_ip(slot)
                session.add(
                    OverlayLighthouse(
                        addresses=key, slot=slot, ip=ip, replica_id=replica_id, seen_at=now
                    )
                )
                try:
                    await session.commit()
                    return LighthouseSlot(slot, ip)
                except IntegrityError:
                    await session.rollback()
        raise OverlayConfigError("could not claim a lighthouse slot (too many replicas racing)")

    async def touch_lighthouse(self, addresses: Sequence[str], now: float) -> None:
        async with self.sessions() as session:
            await session.execute(
                update(OverlayLighthouse)
                .where(OverlayLighthouse.addresses == ",".join(addresses))
                .values(seen_at=now)
            )
            await session.commit()

    async def lighthouses(self, now: float) -> list[LighthouseRef]:
        """The live lighthouses, by slot (none seen lately: every one known, the most
        recently seen first: a grant must name some lighthouse)."""
        async with self.sessions() as session:
            rows = (await session.execute(select(OverlayLighthouse))).scalars().all()
        live = sorted((r for r in rows if r.seen_at > now - LIGHTHOUSE_TTL_S), key=lambda r: r.slot)
        chosen = live or sorted(rows, key=lambda r: -r.seen_at)
        return [LighthouseRef(ip=r.ip, addresses=r.addresses.split(",")) for r in chosen]

    # ---------------------------------------------------------------------- the address book

    async def _allocate(self, cluster_id: str, holder: str, now: float) -> str:
        """The holder's address (the same one on every call)."""
        first = int(self.authority.first_member_address)
        last = int(self.net.broadcast_address) - 1
        for _ in range(ALLOCATE_TRIES):
            async with self.sessions() as session:
                row = await session.get(OverlayHolder, holder)
                if row is not None:
                    return row.ip
                used = set((await session.execute(select(OverlayHolder.ip))).scalars())
                used |= set(
                    (
                        await session.execute(
                            select(OverlayCert.ip).where(
                                OverlayCert.revoked_at.is_not(None), OverlayCert.expires > now
                            )
                        )
                    ).scalars()
                )
                ip = next(
                    (
                        str(ipaddress.IPv4Address(v))
                        for v in range(first, last + 1)
                        if str(ipaddress.IPv4Address(v)) not in used
                    ),
                    None,
                )
                if ip is None:
                    raise RuntimeError(
                        f"the overlay network {self.net} is full: choose a larger one"
                    )
                session.add(OverlayHolder(holder=holder, cluster_id=cluster_id, ip=ip, pub=""))
                try:
                    await session.commit()
                    return ip
                except IntegrityError:  # another replica took it (or this holder) meanwhile
                    await session.rollback()
        raise RuntimeError("could not allocate an overlay address (too many replicas racing)")

    async def grant(
        self,
        cluster_id: str,
        holder: str,
        ends_at: float | None,
        public_key: str,
        now: float | None = None,
    ) -> OverlayGrant:
        """A certificate for the holder's own ``public_key``, and how to find the lighthouses.

        Raises :class:`GrantRefused` if the holder was revoked while this was signed.
        """
        now = time.time() if now is None else now
        ip = await self._allocate(cluster_id, holder, now)
        lifetime = self.authority.lifetime(ends_at, now)
        group = cluster_group(cluster_id)
        crt, _ = await asyncio.to_thread(
            self.authority.sign, holder, ip, [group], lifetime, public_key
        )
        fp = fingerprint(crt)
        async with self.sessions() as session:
            # The certificate is recorded whatever happens: if its holder is gone, blocked.
            current = await session.execute(
                update(OverlayHolder)
                .where(OverlayHolder.holder == holder, OverlayHolder.cluster_id == cluster_id)
                .values(pub=public_key, expires=now + lifetime, lifetime=lifetime)
            )
            gone = _rowcount(current) == 0
            await add_cert(
                session,
                fp,
                holder,
                cluster_id,
                ip,
                now + lifetime,
                revoked_at=now if gone else None,
            )
            await session.commit()
        if gone:
            raise GrantRefused(f"{holder} left cluster {cluster_id} while it was being signed")
        return await self._grant_out(cluster_id, ip, crt, now + lifetime, now)

    async def _grant_out(
        self, cluster_id: str, ip: str, crt: str, expires_at: float, now: float
    ) -> OverlayGrant:
        """What a holder gets: its certificate, the lighthouses, the cluster's blocklist."""
        lighthouses = await self.lighthouses(now)
        if not lighthouses:
            raise RuntimeError("the overlay has no live lighthouse")
        first, more = lighthouses[0], lighthouses[1:]
        return OverlayGrant(
            ca_crt=self.authority.ca_crt,
            crt=crt,
            overlay_ip=ip,
            prefix_len=self.net.prefixlen,
            group=cluster_group(cluster_id),
            lighthouse_ip=first.ip,
            lighthouse_addresses=first.addresses,
            more_lighthouses=more[:7],
            expires_at=expires_at,
            blocklist=await self.blocklist(cluster_id, now),
        )

    async def renew_grant(
        self, holder: str, ends_at: float | None, now: float | None = None
    ) -> OverlayGrant | None:
        """A fresh certificate for the holder that asks for it itself (a user's ``cluster
        connect``): renewed, recorded as in use, as a whole grant (None: unknown)."""
        now = time.time() if now is None else now
        entry = await self.entry(holder, now)
        renewal = await self.renew(holder, ends_at, now)
        if entry is None or renewal is None:
            return None
        await self.renewed(renewal, now)
        return await self._grant_out(entry.cluster, entry.ip, renewal.crt, renewal.expires_at, now)

    async def entry(self, holder: str, now: float | None = None) -> Entry | None:
        now = time.time() if now is None else now
        async with self.sessions() as session:
            row = await session.get(OverlayHolder, holder)
            if row is None:
                return None
            certs = (
                await session.execute(
                    select(OverlayCert.fingerprint, OverlayCert.expires)
                    .where(
                        OverlayCert.holder == holder,
                        OverlayCert.revoked_at.is_(None),
                        OverlayCert.expires > now,
                    )
                    .order_by(OverlayCert.expires)
                )
            ).all()
            return Entry(
                row.cluster_id,
                row.ip,
                row.pub,
                row.expires,
                row.lifetime,
                tuple((f, e) for f, e in certs),
            )

    async def address_of(self, holder: str) -> str | None:
        async with self.sessions() as session:
            row = await session.get(OverlayHolder, holder)
            return row.ip if row is not None else None

    async def addresses(self, holders: Sequence[str]) -> dict[str, tuple[str, bool | None]]:
        """holder -> (address, relayed) for those of ``holders`` in the book (one cluster's)."""
        if not holders:
            return {}
        async with self.sessions() as session:
            rows = await session.execute(
                select(OverlayHolder.holder, OverlayHolder.ip, OverlayHolder.relayed).where(
                    OverlayHolder.holder.in_(list(holders))
                )
            )
            return {h: (ip, relayed) for h, ip, relayed in rows}

    async def set_relayed(self, holder: str, relayed: bool) -> bool:
        """Record what the holder's agent reported; False if the overlay does not know it."""
        async with self.sessions() as session:
            done = await session.execute(
                update(OverlayHolder)
                .where(
                    OverlayHolder.holder == holder, OverlayHolder.relayed.is_distinct_from(relayed)
                )
                .values(relayed=relayed)
            )
            await session.commit()
            if _rowcount(done):
                return True
            return await session.get(OverlayHolder, holder) is not None

    async def holders(self, cluster_id: str) -> list[str]:
        """The member ids (and user certificate names) holding an address in the cluster."""
        async with self.sessions() as session:
            rows = await session.execute(
                select(OverlayHolder.holder).where(OverlayHolder.cluster_id == cluster_id)
            )
            return sorted(rows.scalars())

    async def clusters(self) -> list[str]:
        """The clusters with a holder in the book."""
        async with self.sessions() as session:
            rows = await session.execute(select(OverlayHolder.cluster_id).distinct())
            return sorted(rows.scalars())

    # ------------------------------------------------------------------------ renewal

    async def due(self, now: float) -> list[str]:
        """Holders whose certificate has less than :data:`RENEW_AT` of its lifetime left."""
        async with self.sessions() as session:
            rows = await session.execute(
                select(OverlayHolder.holder).where(
                    OverlayHolder.pub != "",
                    OverlayHolder.expires - OverlayHolder.lifetime * RENEW_AT < now,
                )
            )
            return sorted(rows.scalars())

    async def renew(self, holder: str, ends_at: float | None, now: float) -> OverlayRenewal | None:
        """A new certificate for the holder's same key, address and group (None: unknown).

        Call :meth:`renewed` once the holder took it (until then it stays due).
        """
        entry = await self.entry(holder, now)
        if entry is None or not entry.pub:
            return None
        lifetime = self.authority.lifetime(ends_at, now)
        crt, _ = await asyncio.to_thread(
            self.authority.sign,
            holder,
            entry.ip,
            [cluster_group(entry.cluster)],
            lifetime,
            entry.pub,
        )
        async with self.sessions() as session:  # pushed to its agent: it has it from now on
            alive = await session.get(OverlayHolder, holder) is not None
            await add_cert(
                session,
                fingerprint(crt),
                holder,
                entry.cluster,
                entry.ip,
                now + lifetime,
                revoked_at=None if alive else now,
            )
            await session.commit()
        if not alive:
            return None
        return OverlayRenewal(member_id=holder, crt=crt, expires_at=now + lifetime)

    async def renewed(self, renewal: OverlayRenewal, now: float) -> None:
        """Record that the holder now uses ``renewal`` (no-op if it was revoked meanwhile)."""
        async with self.sessions() as session:
            await session.execute(
                update(OverlayHolder)
                .where(OverlayHolder.holder == renewal.member_id)
                .values(expires=renewal.expires_at, lifetime=renewal.expires_at - now)
            )
            await session.commit()

    # --------------------------------------------------------------------- revocation

    async def revoke(self, holders: Sequence[str], now: float | None = None) -> list[str]:
        """Block every unexpired certificate of ``holders`` and free their addresses.

        Returns the fingerprints newly blocked (empty: nothing to tell anyone).
        """
        now = time.time() if now is None else now
        if not holders:
            return []
        names = list(holders)
        async with self.sessions() as session:
            added = sorted(
                (
                    await session.execute(
                        select(OverlayCert.fingerprint).where(
                            OverlayCert.holder.in_(names),
                            OverlayCert.revoked_at.is_(None),
                            OverlayCert.expires > now,
                        )
                    )
                ).scalars()
            )
            if added:
                await session.execute(
                    update(OverlayCert)
                    .where(OverlayCert.fingerprint.in_(added), OverlayCert.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
            await session.execute(delete(OverlayHolder).where(OverlayHolder.holder.in_(names)))
            await session.commit()
        return added

    async def release_cluster(self, cluster_id: str, now: float | None = None) -> list[str]:
        """Revoke the certificates of a cluster's members (and users), free their
        addresses; returns those holders."""
        gone = await self.holders(cluster_id)
        await self.revoke(gone, now)
        return gone

    async def blocklist(self, cluster_id: str | None = None, now: float | None = None) -> list[str]:
        """The fingerprints to block: the cluster's (None: every cluster's), unexpired.

        Expired certificates are dropped for good: Nebula refuses an expired one anyway.
        """
        now = time.time() if now is None else now
        async with self.sessions() as session:
            await session.execute(delete(OverlayCert).where(OverlayCert.expires <= now))
            query = select(OverlayCert.fingerprint).where(OverlayCert.revoked_at.is_not(None))
            if cluster_id is not None:
                query = query.where(OverlayCert.cluster_id == cluster_id)
            found = sorted((await session.execute(query)).scalars())
            await session.commit()
            return found

    async def blocked_clusters(self, now: float | None = None) -> list[str]:
        """The clusters with an unexpired revoked certificate."""
        now = time.time() if now is None else now
        async with self.sessions() as session:
            rows = await session.execute(
                select(OverlayCert.cluster_id)
                .where(OverlayCert.revoked_at.is_not(None), OverlayCert.expires > now)
                .distinct()
            )
            return sorted(rows.scalars())

    async def revoked(self, fp: str) -> Revoked | None:
        async with self.sessions() as session:
            row = await session.get(OverlayCert, fp)
            if row is None or row.revoked_at is None:
                return None
            return Revoked(row.cluster_id, row.holder, row.expires, row.ip)

    async def count_blocked(self, now: float) -> int:
        async with self.sessions() as session:
            found = await session.execute(
                select(func.count()).where(
                    OverlayCert.revoked_at.is_not(None), OverlayCert.expires > now
                )
            )
            return int(found.scalar_one())


def ca_missing(created_by: str, directory: Path) -> str:
    return (
        f"this network's overlay CA was created by replica {created_by or '?'}, and "
        f"{directory} has no copy: copy ca.crt and ca.key from that replica's overlay "
        "directory there (or give every replica the same --overlay-dir)"
    )


def ca_mismatch(network_fp: str, created_by: str, ca_path: Path, mine_fp: str) -> str:
    return (
        f"this network's overlay CA is {network_fp[:16]}… (created by replica "
        f"{created_by or '?'}), but {ca_path} is {mine_fp[:16]}…: every replica signs with "
        "the same CA: copy ca.crt and ca.key from that replica's overlay directory into "
        f"{ca_path.parent} (or give every replica the same --overlay-dir)"
    )


async def network_ca(sessions: SessionFactory) -> OverlayCA | None:
    """The CA the network recorded (None: no replica ran the overlay yet)."""
    async with sessions() as session:
        return await session.get(OverlayCA, 1)


async def add_cert(
    session: AsyncSession,
    fp: str,
    holder: str,
    cluster_id: str,
    ip: str,
    expires: float,
    revoked_at: float | None = None,
) -> None:
    if await session.get(OverlayCert, fp) is not None:
        return
    session.add(
        OverlayCert(
            fingerprint=fp,
            holder=holder,
            cluster_id=cluster_id,
            ip=ip,
            expires=expires,
            revoked_at=revoked_at,
        )
    )


def _rowcount(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
