"""Watchdog (Prefect-style): nodes that stop heart-beating become `offline`.

A reconciler: flush what we observed (buffered heartbeats), read the facts from the
database, decide, act, record. Idempotent. Each node is isolated (a savepoint each;
errors counted in ``loom_loop_item_errors_total``).

Every replica flushes the heartbeats it received, and says it is alive: each step renews
its own ``replica:<id>`` role lease. Who judges whom:

- a replica judges the agents whose session it holds itself, at the plain timeout, with
  its own memory of their last beat (exact, however far its flush lags);
- the holder of the ``watchdog`` role lease (``loom.coordinator.leases``), claimed in the
  judging transaction itself, also judges the nodes without a session and those whose
  replica is gone (its ``replica:`` lease expired), after the per-session grace; it never
  judges an agent held by a live replica, whose database rows may only be behind.

Each node taken offline is recorded in ``lease_audit``. A judge that dies is replaced once
its role expired.
"""

from __future__ import annotations

import contextlib
import time

from sqlalchemy import select

from loom.coordinator import leases
from loom.coordinator.db.models import Node
from loom.coordinator.loops.isolation import isolated
from loom.coordinator.replicas import sessions as agent_sessions
from loom.coordinator.services import auth as auth_service
from loom.coordinator.services import nodes as node_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import NodeState
from loom.protocol.messages import CLOSE_STALE

ROLE = "watchdog"
#: Each replica's liveness: the role ``replica:<id>``, renewed by its every watchdog step.
LIVENESS = "replica:"
#: Expired liveness rows (replicas gone, ids that will not come back) are kept this long.
LIVENESS_KEEP_S = 86_400.0

_WATCHED = (
    NodeState.REGISTERING.value,
    NodeState.VERIFYING.value,
    NodeState.AVAILABLE.value,
    NodeState.ALLOCATED.value,
)


async def flush_heartbeats(state: CoordinatorState) -> int:
    if not len(state.hub.heartbeats):
        return 0
    async with state.flush_lock, state.session() as session:
        # Fenced: only beats of agents whose session this replica still holds.
        fence = (state.settings.replica_id, state.hub.epochs)
        return await state.hub.heartbeats.flush(session, fence=fence)


async def watchdog_step(state: CoordinatorState, now: float | None = None) -> list[str]:
    """Mark stale nodes offline; return their ids."""
    now = time.time() if now is None else now
    await flush_heartbeats(state)
    cutoff = now - state.settings.heartbeat_timeout_s
    went_offline: list[str] = []
    grace = max(state.settings.heartbeat_timeout_s, state.settings.restart_grace_s)
    if now - state.started_at < grace:
        # Just (re)started: agents have not had a full timeout to reconnect yet, and a
        # node is not dead because *we* were down. Judge nobody until then.
        return went_offline
    me = state.settings.replica_id
    async with state.session() as session:
        role_ttl = max(10.0, 5 * state.settings.watchdog_interval_s)
        alive = await leases.claim_role(session, LIVENESS + me, me, now, role_ttl)
        await session.commit()  # the liveness row is never held locked while judging
        lease = await leases.claim_role(session, ROLE, me, now, role_ttl)
        stmt = select(Node).where(Node.state.in_(_WATCHED), Node.last_heartbeat_at < cutoff)
        if lease is None:  # not the judge: only the agents whose session this replica holds
            stmt = stmt.where(Node.id.in_(agent_sessions.held_here(me)))
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        candidates = list((await session.execute(stmt)).scalars())
        held = await agent_sessions.holders(session, [n.id for n in candidates])
        others = {h.replica_id for h in held.values() if h.replica_id != me}
        live = await leases.live_roles(session, [LIVENESS + r for r in sorted(others)], now)
        for node in candidates:
            seen = state.hub.heartbeats.last_seen(node.id)
            if seen is not None and seen >= cutoff:
                # This replica heard from it recently: the database is only behind
                # (a slow flush), the node is alive. Never take a live node offline.
                continue
            node_id = node.id
            holder = held.get(node_id)
            mine = holder is not None and holder.replica_id == me
            if holder is not None and not mine and LIVENESS + holder.replica_id in live:
                continue  # a live replica holds it: that replica judges it, from memory
            judge = lease if not mine else (lease or alive)
            if judge is None:
                continue  # not ours, and another replica holds the judge's role
            if holder is not None and agent_sessions.in_grace(
                holder, me, node.last_heartbeat_at, now, state.settings.heartbeat_timeout_s,
                state.settings.restart_grace_s,
            ):  # fmt: skip
                continue  # its replica may have died: let it reconnect to another one
            # Each node in its own savepoint: one row that cannot move never stops the rest.
            async with isolated("watchdog", node_id):
                async with session.begin_nested():
                    if holder is not None and not await agent_sessions.unchanged(
                        session, node_id, holder.epoch
                    ):
                        continue  # it reconnected meanwhile (a new epoch): alive
                    gap = now - max(node.last_heartbeat_at or now, seen or 0.0)
                    node_service.transition(
                        session, node, NodeState.OFFLINE, f"no heartbeat for {gap:.1f} s", now
                    )
                    node.connected_since = None
                    leases.audit_role(
                        session, judge, action=f"offline@{now:.3f}", item_id=node_id, now=now
                    )
                went_offline.append(node_id)
        if lease is not None:
            async with isolated("watchdog", "nonces"), session.begin_nested():
                await auth_service.purge_nonces(session, now)
                await leases.purge_roles(session, LIVENESS, now - LIVENESS_KEEP_S)
        await session.commit()
    for node_id in went_offline:
        async with isolated("watchdog", node_id):
            conn = state.hub.connections.get(node_id)
            if conn is not None:
                # A connection that stopped beating is dead even if TCP has not noticed.
                state.hub.detach(conn)
                with contextlib.suppress(Exception):
                    await conn.ws.close(code=CLOSE_STALE, reason="heartbeat timeout; reconnect")
            await state.hub.run_hooks(state.hub.on_offline, node_id)
    return went_offline
