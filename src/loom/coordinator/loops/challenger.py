"""The challenger loop: unannounced re-challenges of idle devices, and retries.

A reconciler over the devices of the nodes connected to this replica (each replica drives
only its own agents, so replicas never challenge the same device):

* **claimed** devices (never decided, e.g. the coordinator restarted mid-challenge, or a
  challenge errored because the agent dropped) are challenged, after a backoff that
  doubles with each error in a row;
* **failed** devices are retried after ``failed_retry_s``, within the class's
  ``retries_per_day`` (an honest but briefly loaded machine gets another chance);
* **verified**, idle devices (no units allocated, node ``available``) are re-challenged at
  random: a Poisson process with mean interval ``duration / budget``, where ``duration`` is
  the device's last measured challenge time. The expected fraction of the device's time
  spent proving itself is then below ``budget`` (1 % by default) and the prover cannot
  predict when the next challenge comes.

Each device to challenge is claimed first (``loom.coordinator.leases``: its row's lease,
for as long as a challenge may take), so two replicas that both briefly hold a socket for
one node (an agent reconnecting) never challenge the same device at once; a device whose
lease another replica holds is left out of the plan. The leases are given back at the first
step after the node's challenges ended.
"""

from __future__ import annotations

import math
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import cast

from sqlalchemy import Table, select

from loom.coordinator import leases
from loom.coordinator.challenger import Challenger, Plan
from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import Device, Node
from loom.coordinator.loops.isolation import isolated
from loom.coordinator.services import verification as vsvc
from loom.core.challenge import params_for
from loom.core.models import DeviceState, NodeState

Random = Callable[[], float]

DEVICES = cast(Table, Device.__table__)
#: Device leases each challenger holds, by node, until that node's challenges ended.
_held: weakref.WeakKeyDictionary[Challenger, dict[str, list[leases.Lease]]] = (
    weakref.WeakKeyDictionary()
)


def lease_ttl_s(challenger: Challenger) -> float:
    """Long enough for one node's challenges (accept, then the openings)."""
    cfg = challenger.config
    return 2 * (cfg.start_timeout_s + cfg.open_timeout_s)


async def _release_finished(challenger: Challenger) -> None:
    held = _held.setdefault(challenger, {})
    done = [n for n in held if not challenger.node_busy(n)]
    if not done:
        return
    async with challenger.state.session() as session:
        for node_id in done:
            for lease in held.pop(node_id):
                await leases.release(session, DEVICES, lease)
        await session.commit()


async def _claim_plans(
    challenger: Challenger, plans: dict[str, Plan], now: float
) -> dict[str, Plan]:
    """Keep only the devices this replica could lease (per node: a handful of ids)."""
    state = challenger.state
    held = _held.setdefault(challenger, {})
    out: dict[str, Plan] = {}
    async with state.session() as session:
        for node_id, plan in plans.items():
            ids = [device_id for device_id, _ in plan]
            got = await leases.claim(
                session,
                DEVICES,
                owner=state.settings.replica_id,
                now=now,
                ttl_s=lease_ttl_s(challenger),
                where=DEVICES.c.id.in_(ids),
                limit=len(ids),
            )
            if not got:
                continue
            held.setdefault(node_id, []).extend(got)
            claimed = {lease.item_id for lease in got}
            out[node_id] = [(d, trigger) for d, trigger in plan if d in claimed]
        await session.commit()
    return out


def recheck_probability(dt: float, duration_s: float, budget: float) -> float:
    """P(at least one re-challenge in ``dt`` s) for a Poisson process of mean
    ``duration_s / budget`` between challenges."""
    mean = max(duration_s, 1e-3) / max(budget, 1e-9)
    return 1.0 - math.exp(-max(0.0, dt) / mean)


async def challenger_step(
    challenger: Challenger, now: float | None = None, rng: Random = random.random
) -> dict[str, Plan]:
    """Decide which devices to challenge now and start them; returns the plans started."""
    state, cfg = challenger.state, challenger.config
    now = time.time() if now is None else now
    last = challenger.last_tick
    dt = cfg.loop_s if last is None else min(max(0.0, now - last), 10 * cfg.loop_s)
    challenger.last_tick = now
    async with isolated("challenger", "leases"):
        await _release_finished(challenger)
    connected = [n for n in state.hub.connections if not challenger.node_busy(n)]
    if not connected:
        return {}
    async with state.session() as session:
        nodes: dict[str, Node] = {}
        for chunk in chunks(connected):  # bounded IN-lists, whatever the network's size
            found = await session.execute(
                select(Node).where(Node.id.in_(chunk), Node.state != NodeState.BANNED.value)
            )
            nodes.update({n.id: n for n in found.scalars()})
        devices = await vsvc.present_devices(session, list(nodes))
        hist = await vsvc.recent_history(session, [d.id for d in devices], now)
    plans: dict[str, Plan] = {}
    for dev in devices:
        async with isolated("challenger", dev.id):
            _decide(challenger, dev, nodes[dev.node_id], hist.get(dev.id), now, dt, rng, plans)
    if plans:
        plans = await _claim_plans(challenger, plans, now)
    # Verifying nodes whose CPU has passed (read just now) become available: usually none,
    # so a fleet stuck in `verifying` costs no read of its own (it used to be a session and
    # two reads per node every tick); promote_many re-checks both in its transaction.
    passed = {
        d.node_id
        for d in devices
        if d.id == vsvc.cpu_device_id(d.node_id) and d.state == DeviceState.VERIFIED.value
    }
    waiting: list[str] = []
    for node_id, node in nodes.items():
        async with isolated("challenger", node_id):
            if node_id in plans:
                challenger.schedule(node_id, plans[node_id])
            elif node.state == NodeState.VERIFYING.value and node_id in passed:
                waiting.append(node_id)
    if waiting:
        async with isolated("challenger", "promote"):
            await challenger.promote_many(waiting)
    return plans


def _decide(
    challenger: Challenger,
    dev: Device,
    node: Node,
    h: vsvc.DeviceHistory | None,
    now: float,
    dt: float,
    rng: Random,
    plans: dict[str, Plan],
) -> None:
    """Whether one device is challenged now (and why), added to `plans`."""
    cfg = challenger.config
    cls = vsvc.device_class_for(dev, cfg)
    if cls is None:
        return
    params = params_for(cls)
    trigger: str | None = None
    if dev.state == DeviceState.CLAIMED.value:
        if h is None:
            trigger = "initial"
        elif h.attempts_24h < params.retries_per_day:
            wait = 0.0
            if h.last_outcome == "error":
                wait = min(cfg.error_retry_max_s, cfg.error_retry_s * 2 ** (h.errors_in_a_row - 1))
            if now - h.last_ended_at >= wait:
                trigger = "retry"
    elif dev.state == DeviceState.FAILED.value:
        if h is None or (
            h.attempts_24h < params.retries_per_day and now - h.last_ended_at >= cfg.failed_retry_s
        ):
            trigger = "retry"
    elif (
        dev.state == DeviceState.VERIFIED.value
        and dev.allocated_units == 0
        and node.state == NodeState.AVAILABLE.value
    ):
        duration = (
            (h.last_pass_duration_s if h is not None else None)
            or challenger.durations.get(dev.id)
            or params.expected_duration_s
        )
        if rng() < recheck_probability(dt, duration, cfg.budget):
            trigger = "recheck"
    if trigger is not None:
        plans.setdefault(dev.node_id, []).append((dev.id, trigger))


def challenger_loop(challenger: Challenger) -> Callable[[], Awaitable[None]]:
    """The step to hand to ``CoordinatorState.spawn_loop``."""

    async def step() -> None:
        await challenger_step(challenger)

    return step
