"""The challenge driver: runs hardware challenges against connected agents over the hub.

One :class:`~loom.core.challenge.VerifierSession` per device challenge, streamed over the
agent WebSocket::

    C → A  command challenge.start  {ChallengeStart}   ack: accepted, or refused with why
    A → C  report  challenge.commit {RootCommit}       one per round, sent as it is done
    C → A  command challenge.nonce  {NonceRelease}     fire and forget (no ack awaited)
    C → A  command challenge.open   {OpeningsRequest}  ack result: the OpeningsResponse
    C → A  command challenge.abort  {challenge_id}     the end, either way

Root arrival times are the coordinator's ``time.monotonic()`` taken when the report's frame
arrived (before parsing), so JSON and database work never inflate a prover's time. The
nonce of round r+d goes out from the report handler itself, without awaiting any ack.
Openings are verified in a worker thread.

Outcomes: passed → device verified (with its measured rate); failed → device failed
(unplaceable); a failing opening under a signed root → evidence stored, node banned and
disconnected; error (the agent disconnected mid-rounds) → nothing held against anyone,
retried by the loop. Once openings are requested, going silent is a failure: a prover must
not escape a bad commitment by hanging up.

Nodes: a node in ``verifying`` becomes ``available`` as soon as its CPU is verified; GPUs
that fail only become unplaceable. Challenges of nodes with the same source address and
hostname run one at a time (on ``loom up`` they share one CPU and would measure each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import Device, Node
from loom.coordinator.hub import AgentConnection, AgentNotConnected, CommandFailed
from loom.coordinator.services import nodes as node_service
from loom.coordinator.services import verification as vsvc
from loom.coordinator.services.verification import ChallengerConfig
from loom.coordinator.state import CoordinatorState
from loom.core.challenge import (
    ChallengeParams,
    ChallengeResult,
    ChallengeStateError,
    Opening,
    OpeningsRequest,
    RootCommit,
    SessionState,
    VerifierSession,
    format_rate,
    params_for,
)
from loom.core.models import DeviceState, NodeState
from loom.protocol.commands import ChallengeNonce, ChallengeOpen, ChallengeStart
from loom.protocol.messages import CLOSE_BANNED, Report

log = logging.getLogger(__name__)

#: Challenges one replica runs at once (each holds a database session at its end and may
#: verify openings in a thread); the rest wait their turn, their timing unaffected (a
#: challenge's clock starts when it is sent).
CONCURRENT_CHALLENGES = 64

#: Keep each openings answer well under the 1 MiB frame limit.
OPENINGS_BATCH_BYTES = 256 * 1024

Plan = list[tuple[str, str]]
"""(device id, trigger) pairs to challenge, in order."""


@dataclass
class _Active:
    node_id: str
    session: VerifierSession
    conn: AgentConnection
    settled: asyncio.Event


@dataclass(frozen=True)
class Verdict:
    device_id: str
    outcome: str
    result: ChallengeResult
    banned: bool = False


def openings_batches(request: OpeningsRequest, params: ChallengeParams) -> list[OpeningsRequest]:
    """Split a request so that each answer (hex leaves + Merkle paths) stays small."""
    depth = max(1, (params.tile_rows - 1).bit_length())
    per_opening = 16 * params.tile_cols + 70 * (depth + 1) + 200
    size = max(1, OPENINGS_BATCH_BYTES // per_opening)
    items = request.openings
    return [
        OpeningsRequest(challenge_id=request.challenge_id, openings=items[i : i + size])
        for i in range(0, len(items), size)
    ]


def _machine_key(state: CoordinatorState, node: Node) -> str:
    """Nodes that (probably) share a machine: same source address and same hostname.

    Both are needed: an attacker cannot stall honest nodes by claiming their hostname
    (it would need their address too), and a farm behind one NAT still runs in parallel.
    """
    return _machine_key_of(state, node.id, node.hostname or "")


def _machine_key_of(state: CoordinatorState, node_id: str, hostname: str) -> str:
    conn = state.hub.connections.get(node_id)
    client = getattr(conn.ws, "client", None) if conn is not None else None
    address = str(getattr(client, "host", "") or "")
    return f"{address or node_id}/{hostname or node_id}"


def _cpu_verified(node_id: str, devices: Sequence[Device]) -> bool:
    cpu = vsvc.cpu_device_id(node_id)
    return any(d.id == cpu and d.state == DeviceState.VERIFIED.value for d in devices)


@dataclass
class _Facts:
    """What :meth:`Challenger.on_connected` reads of a node."""

    state: str
    node_key: str
    hostname: str
    devices: list[Device]


@dataclass(frozen=True)
class _Ready:
    """A node's facts handed to its challenge task (read once for a batch of nodes)."""

    node_key: bytes
    host: str
    devices: Sequence[Device]


class Challenger:
    """Drives challenges for the nodes connected to this coordinator replica."""

    def __init__(
        self,
        state: CoordinatorState,
        config: ChallengerConfig | None = None,
        *,
        entropy: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.state = state
        self.config = config or ChallengerConfig.from_settings(state.settings)
        self._entropy = entropy
        self._active: dict[bytes, _Active] = {}
        self._busy_devices: set[str] = set()
        self._node_tasks: dict[str, asyncio.Task[None]] = {}
        self._host_locks: dict[str, asyncio.Lock] = {}
        #: At most this many challenges at once on this replica: a storm of new nodes
        #: queues here instead of opening thousands of sessions (and verifications) at once.
        self._slots = asyncio.Semaphore(CONCURRENT_CHALLENGES)
        self.durations: dict[str, float] = {}
        self.last_tick: float | None = None

    # ---------------------------------------------------------------- hub hooks
    def install(self, *, on_connect: bool = True) -> None:
        """Register the hooks (after the lifecycle's on_connect, which sets `verifying`).

        ``on_connect=False``: connects come in batches through :meth:`on_connected`
        (``loom.coordinator.connects``, as the app wires it) instead of one hook each.
        """
        if on_connect:
            self.state.hub.on_connect.append(self.on_connect)
        self.state.hub.on_offline.append(self.on_offline)
        self.state.hub.on_report("challenge.commit", self.on_commit)

    async def on_connect(self, node_id: str) -> None:
        # Runs inside the handshake: never await an agent here.
        self.schedule(node_id, None)

    async def on_connected(self, node_ids: Sequence[str]) -> None:
        """Connected nodes (activated, ``loom.coordinator.connects``): their first
        challenges, prepared for all of them at once.

        One read of the nodes, their devices and their challenge history (bounded
        chunks), one transaction promoting those already verified, then one background
        task per node that has something to prove (the challenges themselves talk to
        each agent).
        """
        ids = [n for n in dict.fromkeys(node_ids) if n not in self._node_tasks]
        if not ids:
            return
        now = time.time()
        facts: dict[str, _Facts] = {}
        async with self.state.session() as session:
            for chunk in chunks(ids):
                rows = await session.execute(
                    select(Node.id, Node.state, Node.node_key, Node.hostname).where(
                        Node.id.in_(chunk), Node.state != NodeState.BANNED.value
                    )
                )
                for node_id, node_state, node_key, hostname in rows:
                    facts[node_id] = _Facts(node_state, node_key, hostname or "", [])
            devices = await vsvc.present_devices(session, list(facts))
            for dev in devices:
                facts[dev.node_id].devices.append(dev)
            hist = await vsvc.recent_history(session, [d.id for d in devices], now)
        promote = [
            node_id
            for node_id, f in facts.items()
            if f.state == NodeState.VERIFYING.value and _cpu_verified(node_id, f.devices)
        ]
        if promote:
            try:
                await self.promote_many(promote)
            except Exception as exc:  # e.g. a deadlock with the heartbeat flush: one by one
                log.warning("promoting %d node(s) failed (%s): one by one", len(promote), exc)
                for node_id in promote:
                    with contextlib.suppress(Exception):
                        await self.promote(node_id)
        for node_id, f in facts.items():
            if node_id in self._node_tasks:
                continue
            plan = self._plan(node_id, f.devices, hist)
            if not plan:
                continue
            host = _machine_key_of(self.state, node_id, f.hostname)
            ready = _Ready(bytes.fromhex(f.node_key), host, f.devices)
            self._start(node_id, self._verify_node(node_id, plan, ready))

    async def promote_many(self, node_ids: Sequence[str]) -> list[str]:
        """:meth:`promote` for many nodes in one transaction; returns those promoted."""
        done: list[str] = []
        async with self.state.session() as session:
            for chunk in chunks(node_ids):
                nodes = list(
                    (
                        await session.execute(
                            select(Node).where(
                                Node.id.in_(chunk), Node.state == NodeState.VERIFYING.value
                            )
                        )
                    ).scalars()
                )
                cpus = {vsvc.cpu_device_id(n.id) for n in nodes}
                verified = set(
                    (
                        await session.execute(
                            select(Device.id).where(
                                Device.id.in_(cpus), Device.state == DeviceState.VERIFIED.value
                            )
                        )
                    ).scalars()
                )
                now = time.time()
                for node in nodes:
                    if vsvc.cpu_device_id(node.id) in verified:
                        why = "hardware verified (cpu)"
                        node_service.transition(session, node, NodeState.AVAILABLE, why, now)
                        done.append(node.id)
            await session.commit()
        return done

    async def on_offline(self, node_id: str) -> None:
        for active in self._active.values():
            if active.node_id == node_id:
                active.settled.set()

    async def on_commit(self, node_id: str, report: Report, received_at: float) -> None:
        """A signed root arrived (timed at ``received_at``): record it, release a nonce."""
        try:
            commit = RootCommit.model_validate(report.data)
        except ValidationError as exc:
            for bad in self._active.values():
                if bad.node_id == node_id:
                    bad.session.abort(f"protocol: malformed root commit ({exc.errors()[0]})")
                    bad.settled.set()
            return
        active = self._active.get(commit.challenge_id)
        if active is None or active.node_id != node_id:
            return  # a stale commit (an earlier connection) or another node's challenge
        try:
            release = active.session.on_commit(commit, arrival_time=received_at)
        except ChallengeStateError as exc:
            log.info("ignoring a root from %s: %s", node_id, exc)
            return
        if release is not None:
            with contextlib.suppress(Exception):
                await self.state.agents.challenge_nonce(node_id, ChallengeNonce.of(release))
        if active.session.state is not SessionState.AWAITING_ROOTS:
            active.settled.set()

    # ---------------------------------------------------------------- scheduling
    def node_busy(self, node_id: str) -> bool:
        return node_id in self._node_tasks

    def schedule(self, node_id: str, plan: Plan | None) -> bool:
        """Challenge a node's devices in the background (None: whatever it needs)."""
        if node_id in self._node_tasks:
            return False
        self._start(node_id, self._verify_node(node_id, plan))
        return True

    def _start(self, node_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"verify-{node_id}")
        self._node_tasks[node_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._node_tasks.get(node_id) is t:
                del self._node_tasks[node_id]

        task.add_done_callback(done)
        self.state.track(task)

    async def _initial_plan(self, node_id: str, devices: Sequence[Device]) -> Plan:
        now = time.time()
        async with self.state.session() as session:
            hist = await vsvc.recent_history(session, [d.id for d in devices], now)
        return self._plan(node_id, devices, hist)

    def _plan(
        self, node_id: str, devices: Sequence[Device], hist: Mapping[str, vsvc.DeviceHistory]
    ) -> Plan:
        """What a connected node's devices need proven now (the initial plan)."""
        plan: Plan = []
        for dev in devices:
            cls = vsvc.device_class_for(dev, self.config)
            if cls is None or dev.state == DeviceState.VERIFIED.value:
                continue
            h = hist.get(dev.id)
            if h is not None and h.attempts_24h >= params_for(cls).retries_per_day:
                continue
            if dev.state == DeviceState.CLAIMED.value or dev.id == vsvc.cpu_device_id(node_id):
                plan.append((dev.id, "initial" if h is None else "retry"))
        return plan

    async def _verify_node(
        self, node_id: str, plan: Plan | None, ready: _Ready | None = None
    ) -> None:
        """Challenge ``plan``'s devices (None: what the node needs); ``ready``: the node's
        facts as :meth:`on_connected` read them (and promoted it), not read again here."""
        try:
            if ready is None:
                async with self.state.session() as session:
                    node = await session.get(Node, node_id)
                    if node is None or node.state == NodeState.BANNED.value:
                        return
                    devices: Sequence[Device] = await vsvc.present_devices(session, [node_id])
                    node_key = bytes.fromhex(node.node_key)
                    host = _machine_key(self.state, node)
                await self.promote(node_id)
            else:
                node_key, host, devices = ready.node_key, ready.host, ready.devices
            if plan is None:
                plan = await self._initial_plan(node_id, devices)
            by_id = {d.id: d for d in devices}
            lock = self._host_locks.setdefault(host, asyncio.Lock())
            for device_id, trigger in plan:
                dev = by_id.get(device_id)
                cls = vsvc.device_class_for(dev, self.config) if dev is not None else None
                if dev is None or cls is None:
                    continue
                async with lock, self._slots:
                    conn = self.state.hub.connections.get(node_id)
                    if conn is None or conn.closed:
                        return
                    verdict = await self.challenge_device(
                        conn, node_key, dev.id, dev.model, params_for(cls), trigger
                    )
                if verdict.banned:
                    return
                if verdict.outcome == "passed":  # only a pass can verify the CPU
                    await self.promote(node_id)
        except Exception:
            log.exception("verification of node %s failed", node_id)

    async def promote(self, node_id: str) -> bool:
        """A `verifying` node whose CPU is verified becomes `available`."""
        async with self.state.session() as session:
            node = await session.get(Node, node_id)
            cpu = await session.get(Device, vsvc.cpu_device_id(node_id))
            if node is None or node.state != NodeState.VERIFYING.value:
                return False
            if cpu is None or cpu.state != DeviceState.VERIFIED.value:
                return False
            node_service.transition(
                session, node, NodeState.AVAILABLE, "hardware verified (cpu)", time.time()
            )
            await session.commit()
            return True

    # ---------------------------------------------------------------- one challenge
    async def challenge_device(
        self,
        conn: AgentConnection,
        node_key: bytes,
        device_id: str,
        model: str,
        params: ChallengeParams,
        trigger: str,
    ) -> Verdict:
        session = VerifierSession(params, device_id, node_key, entropy=self._entropy)
        active = _Active(conn.node_id, session, conn, asyncio.Event())
        started_wall, t0 = time.time(), time.monotonic()
        self._active[session.challenge_id] = active
        self._busy_devices.add(device_id)
        try:
            result, outcome = await self._run(active)
        finally:
            self._active.pop(session.challenge_id, None)
            self._busy_devices.discard(device_id)
            if not conn.closed:
                with contextlib.suppress(Exception):
                    await self.state.agents.challenge_abort(conn.node_id, session.challenge_id)
        duration = time.monotonic() - t0
        verdict = await self._record(
            conn, device_id, model, result, outcome, trigger, started_wall, duration
        )
        return verdict

    async def _run(self, active: _Active) -> tuple[ChallengeResult, str]:
        session, conn = active.session, active.conn
        start = session.start(now=time.monotonic())
        try:
            await self.state.agents.challenge_start(
                conn.node_id, ChallengeStart.of(start), timeout=self.config.start_timeout_s
            )
        except AgentNotConnected:
            return session.abort("agent disconnected before the challenge started"), "error"
        except CommandFailed as exc:
            if conn.closed or "no answer from node" in str(exc):
                return session.abort(f"challenge not started: {exc}"), "error"
            return session.abort(f"the agent refused the challenge: {exc}"), "failed"

        while session.state is SessionState.AWAITING_ROOTS:
            if conn.closed or self.state.hub.connections.get(conn.node_id) is not conn:
                return session.abort("agent disconnected during the rounds"), "error"
            now = time.monotonic()
            if session.check_timeout(now) is not None:
                break
            deadline = session.deadline or now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(active.settled.wait(), max(0.01, min(1.0, deadline - now)))
        if session.result is not None:
            return session.result, "failed"

        request = session.draw_openings()
        openings: list[Opening] = []
        for batch in openings_batches(request, session.params):
            try:
                answer = await self.state.agents.challenge_open(
                    conn.node_id, ChallengeOpen.of(batch), timeout=self.config.open_timeout_s
                )
            except (AgentNotConnected, CommandFailed) as exc:
                return session.abort(f"openings not answered: {exc}"), "failed"
            if answer.challenge_id != session.challenge_id:
                return session.abort("openings answered for another challenge id"), "failed"
            openings.extend(answer.openings)
        result = await asyncio.to_thread(session.verify_openings, openings)
        return result, "passed" if result.passed else "failed"

    async def _record(
        self,
        conn: AgentConnection,
        device_id: str,
        model: str,
        result: ChallengeResult,
        outcome: str,
        trigger: str,
        started_wall: float,
        duration: float,
    ) -> Verdict:
        now = time.time()
        banned = False
        async with self.state.session() as session:
            node = await node_service.get_node(session, conn.node_id)
            device = await session.get(Device, device_id)
            if (
                outcome == "failed"
                and trigger == "recheck"
                and device is not None
                and device.allocated_units > 0
                and result.openings_failed == 0
                and result.timing_passed is False
                and result.measured_rate is not None
            ):
                outcome = "interrupted"  # work arrived mid re-challenge: inconclusive
            evidence = vsvc.record_result(
                session,
                node=node,
                device=device,
                challenged_model=model,
                result=result,
                outcome=outcome,
                trigger=trigger,
                started_at=started_wall,
                ended_at=now,
                duration_s=duration,
            )
            if evidence:
                banned = vsvc.ban(
                    session,
                    node,
                    f"proven fraud: wrong opening under a signed root ({device_id})",
                    now,
                )
                node.connected_since = None
            await session.commit()
        rate = format_rate(result.measured_rate) if result.measured_rate else "n/a"
        log.info(
            "challenge %s of %s (%s): %s at %s: %s",
            result.challenge_id.hex()[:12],
            device_id,
            trigger,
            outcome,
            rate,
            result.reason,
        )
        if outcome == "passed":
            self.durations[device_id] = duration
        if banned:
            log.warning("node %s banned: fraud evidence stored for %s", conn.node_id, device_id)
            self.state.hub.detach(conn)
            with contextlib.suppress(Exception):
                await conn.ws.close(code=CLOSE_BANNED, reason="banned: fraud evidence stored")
            await self.state.hub.run_hooks(self.state.hub.on_offline, conn.node_id)
        return Verdict(device_id, outcome, result, banned)
