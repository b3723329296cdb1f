"""The agent's cluster members: turn coordinator commands into Ray nodes in sandboxes.

Commands (typed: :mod:`loom.protocol.commands`; each answered by an ack; repeating one
for the same member is a no-op):

- ``member.start`` {cluster_id, member_id, role, token, head_address, num_cpus,
  gpu_indices, env, overlay} → starts the member's Ray node and acks only once the node is
  registered with the head: {gcs_address, dashboard_url, client_address, ray_node_id}.
- ``member.stop`` {member_id} → stops the whole process tree and removes its files.
- ``member.sync`` {members: [ids]} → stops every local member not in the list (after a
  coordinator restart or a long disconnect) and reports the ones still running.
- ``member.seen`` {member_id} → {alive: [Ray node ids]}: what that member's node sees
  ALIVE in the head's GCS (the coordinator confirms the *other* members with it).

A health loop watches running members; a dead Ray node is reported as ``member.lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loom.agent.main import Handler, handler, handlers
from loom.agent.netns import MemberNet, NetnsError, NetnsManager
from loom.agent.overlay import MemberOverlay, OverlayError, generate_key, nebula_binary
from loom.agent.raynode import (
    NodeHealth,
    PortAllocator,
    RayNode,
    RayNodeError,
    RayNodeSpec,
    cleanup_stale_members,
)
from loom.agent.raynode_spec import MemberPaths, member_short_id
from loom.agent.runtimes import Runtime
from loom.protocol.commands import (
    MemberOverlayBlocklist,
    MemberOverlayBlocklistReply,
    MemberOverlayCert,
    MemberOverlayCertReply,
    MemberOverlayKey,
    MemberOverlayKeyReply,
    MemberPeerLost,
    MemberPeerLostReply,
    MemberSeen,
    MemberSeenReply,
    MemberStart,
    MemberStarted,
    MemberStop,
    MemberStopped,
    MemberSync,
    MemberSynced,
)
from loom.protocol.overlay import OverlayGrant

log = logging.getLogger(__name__)

ReportFn = Callable[[str, dict[str, Any]], Awaitable[None]]

READY_TIMEOUT_S = 75.0
#: A full health probe asks the head's GCS (a subprocess importing Ray): kept infrequent.
#: Process death is noticed at once by a cheap watcher per member.
HEALTH_INTERVAL_S = 30.0
#: `member.seen` (the coordinator confirming other members, about every 10 s) reuses a
#: GCS probe up to this old.
SEEN_MAX_AGE_S = 5.0


class MemberManager:
    def __init__(
        self,
        base_dir: Path,
        runtime: Runtime,
        report: ReportFn,
        *,
        node_ip: str = "127.0.0.1",
        ports: PortAllocator | None = None,
        netns: NetnsManager | None = None,
    ) -> None:
        self.base_dir = base_dir
        #: Builds each member's own network namespace (None: members share the host's).
        self.netns = netns
        self.nets: dict[str, MemberNet] = {}
        self.overlays: dict[str, MemberOverlay] = {}
        self.runtime = runtime
        self.report = report
        self.node_ip = node_ip
        self.ports = ports or PortAllocator()
        self.nodes: dict[str, RayNode] = {}
        self.info: dict[str, MemberStarted] = {}
        self._starting: dict[str, asyncio.Task[MemberStarted]] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}
        #: The last GCS probe of each member (monotonic time, result): `member.seen` and
        #: the health loop share it, so confirming others costs no extra probes.
        self._probed: dict[str, tuple[float, NodeHealth]] = {}

    def handlers(self) -> dict[str, Handler[Any]]:
        return handlers(
            handler(MemberStart, self.start),
            handler(MemberStop, self.stop),
            handler(MemberSync, self.sync),
            handler(MemberSeen, self.seen),
            handler(MemberPeerLost, self.peer_lost),
            handler(MemberOverlayKey, self.overlay_key),
            handler(MemberOverlayCert, self.overlay_cert),
            handler(MemberOverlayBlocklist, self.overlay_blocklist),
        )

    async def overlay_key(self, cmd: MemberOverlayKey) -> MemberOverlayKeyReply:
        """Generate the member's Nebula keypair here (the private key stays on this machine)."""
        if self.netns is None or nebula_binary() is None:
            return MemberOverlayKeyReply()  # no overlay here: its members use node_ip
        try:
            spec = RayNodeSpec(  # only for the member's directory (the same for any role)
                cluster_id=cmd.cluster_id,
                member_id=cmd.member_id,
                role="head",
                token="0" * 16,
                base_dir=self.base_dir,
            )
            where = MemberPaths.for_spec(spec).root / "nebula"  # hidden from the sandbox
            public = await asyncio.to_thread(generate_key, where)
        except (OverlayError, OSError, ValueError) as exc:
            raise RayNodeError(f"overlay key of {cmd.member_id}: {exc}") from None
        return MemberOverlayKeyReply(public_key=public)

    async def overlay_cert(self, cmd: MemberOverlayCert) -> MemberOverlayCertReply:
        """A renewed certificate for a running member: swap it in, Nebula reloads it."""
        overlay = self.overlays.get(cmd.member_id)
        if overlay is None:
            return MemberOverlayCertReply()
        return MemberOverlayCertReply(reloaded=await overlay.renew(cmd.crt))

    async def overlay_blocklist(self, cmd: MemberOverlayBlocklist) -> MemberOverlayBlocklistReply:
        """The cluster's revoked certificates: each of its members here reloads Nebula."""
        mine = [
            (member_id, overlay)
            for member_id, overlay in list(self.overlays.items())
            if overlay.grant.group == cmd.cluster_id  # the cluster's group is its id
        ]
        done = await asyncio.gather(*(o.block(cmd.fingerprints) for _, o in mine))
        return MemberOverlayBlocklistReply(
            reloaded=[m for (m, _), ok in zip(mine, done, strict=True) if ok]
        )

    async def cleanup_leftovers(self) -> list[str]:
        """Remove members left by a previous agent process (crash, SIGKILL)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        stale = await cleanup_stale_members(self.base_dir)
        if self.netns is not None:
            stale += await asyncio.to_thread(self.netns.cleanup_leftovers)
        return stale

    def start_health_loop(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop())

    async def start(self, cmd: MemberStart) -> MemberStarted:
        received_at = time.time()
        member_id = cmd.member_id
        if member_id in self.info:
            return self.info[member_id].model_copy(update={"received_at": received_at})
        task = self._starting.get(member_id)
        if task is None:
            task = asyncio.create_task(self._start(cmd))
            self._starting[member_id] = task
        try:
            started = await asyncio.shield(task)
            return started.model_copy(update={"received_at": received_at})
        finally:
            if task.done():
                self._starting.pop(member_id, None)

    async def _start(self, cmd: MemberStart) -> MemberStarted:
        spec = RayNodeSpec(
            cluster_id=cmd.cluster_id,
            member_id=cmd.member_id,
            role=cmd.role,
            token=cmd.token,
            base_dir=self.base_dir,
            head_address=cmd.head_address or None,
            num_cpus=cmd.num_cpus,
            gpu_indices=tuple(cmd.gpu_indices),
            env=dict(cmd.env),
            node_ip=self.node_ip,
            include_dashboard=cmd.role == "head",
        )
        grant = cmd.overlay
        began = time.monotonic()
        steps: dict[str, float] = {}  # where a member's start goes (logged when ready)
        if self.netns is not None:
            try:
                net = await asyncio.to_thread(
                    self.netns.create, member_short_id(spec), spec.cluster_id
                )
            except NetnsError as exc:
                raise RayNodeError(f"network of {spec.member_id}: {exc}") from None
            steps["netns"] = time.monotonic() - began
            self.nets[spec.member_id] = net
            spec = dataclasses.replace(
                spec, node_ip=net.ns_ip, netns=net.path, dashboard_host=net.ns_ip
            )
            if grant is not None:
                spec = await self._join_overlay(spec, net, grant)
                steps |= self.overlays[spec.member_id].timings
        elif grant is not None:
            log.warning(
                "member %s: members share the host network here, so it does not join the "
                "cluster's overlay (it is reachable only on %s)",
                spec.member_id,
                self.node_ip,
            )
        node = RayNode(spec, self.runtime, self.ports)
        self.nodes[spec.member_id] = node
        ray_began = time.monotonic()
        try:
            await node.start()
            info = await node.wait_ready(READY_TIMEOUT_S)
            steps["ray"] = time.monotonic() - ray_began
        except (RayNodeError, OSError) as exc:
            self.nodes.pop(spec.member_id, None)
            with contextlib.suppress(Exception):
                await self._stop_node(spec.member_id, node)
            raise RayNodeError(f"{exc}") from None
        result = MemberStarted(
            gcs_address=info.gcs_address,
            dashboard_url=info.dashboard_url or "",
            client_address=info.client_address or "",
            ray_node_id=info.node_id,
            node_ip=info.node_ip,
        )
        self.info[spec.member_id] = result
        log.info(
            "member %s (%s) ready in %.2f s: %s",
            spec.member_id,
            spec.role,
            time.monotonic() - began,
            ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()),
        )
        watcher = asyncio.create_task(self._watch(spec.member_id, node))
        self._watchers[spec.member_id] = watcher
        return result

    async def _watch(self, member_id: str, node: RayNode) -> None:
        """Report the member lost as soon as its Ray process exits on its own."""
        code = await node.wait_exit()
        if self.nodes.get(member_id) is node and member_id in self.info:
            await self._lost(member_id, node, f"Ray node process exited with code {code}")

    async def _lost(self, member_id: str, node: RayNode, reason: str) -> None:
        log.warning("member %s lost: %s", member_id, reason)
        self.info.pop(member_id, None)
        self._probed.pop(member_id, None)
        self.nodes.pop(member_id, None)
        with contextlib.suppress(Exception):
            await self._stop_node(member_id, node)
        await self.report("member.lost", {"member_id": member_id, "reason": reason})

    async def stop(self, cmd: MemberStop) -> MemberStopped:
        member_id = cmd.member_id
        task = self._starting.pop(member_id, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        node = self.nodes.pop(member_id, None)
        self.info.pop(member_id, None)
        self._probed.pop(member_id, None)
        watcher = self._watchers.pop(member_id, None)
        if watcher is not None:
            watcher.cancel()
        await self._stop_node(member_id, node)
        return MemberStopped(stopped=node is not None)

    async def _join_overlay(
        self, spec: RayNodeSpec, net: MemberNet, grant: OverlayGrant
    ) -> RayNodeSpec:
        """Start the member's Nebula in its namespace; the Ray node binds the overlay IP."""
        assert self.netns is not None
        where = MemberPaths.for_spec(spec).root / "nebula"  # hidden from the sandbox
        overlay = MemberOverlay(grant, net, where, self.netns)
        self.overlays[spec.member_id] = overlay
        try:
            await overlay.start()
            if spec.role == "worker" and spec.head_address:
                await overlay.wait_reachable(spec.head_address)
        except OverlayError as exc:
            await self._stop_node(spec.member_id, None)
            raise RayNodeError(f"overlay of {spec.member_id}: {exc}") from None
        overlay.watch(self.report, spec.member_id)  # tells the coordinator when relayed
        # The head's dashboard (Jobs API) binds the overlay address too: reachable by the
        # cluster's members and its users' certificates (`loom cluster connect`), and by
        # this host (a /32 route: `loom cluster forward`), never by the supplier's LAN.
        ip = grant.overlay_ip
        return dataclasses.replace(spec, node_ip=ip, dashboard_host=ip)

    async def _stop_node(self, member_id: str, node: RayNode | None) -> None:
        """Stop the node, its Nebula, then remove its network namespace (always)."""
        try:
            if node is not None:
                await node.stop()
        finally:
            overlay = self.overlays.pop(member_id, None)
            if overlay is not None:
                with contextlib.suppress(Exception):
                    await overlay.stop()
            net = self.nets.pop(member_id, None)
            if net is not None and self.netns is not None:
                await asyncio.to_thread(self.netns.destroy, net)

    async def sync(self, cmd: MemberSync) -> MemberSynced:
        wanted = set(cmd.members)
        stopped = []
        for member_id in list(self.nodes):
            if member_id not in wanted:
                await self.stop(MemberStop(member_id=member_id))
                stopped.append(member_id)
        return MemberSynced(stopped=stopped, running=sorted(self.info))

    async def seen(self, cmd: MemberSeen) -> MemberSeenReply:
        """The Ray node ids the head's GCS lists ALIVE, as this member's node sees them.

        The coordinator uses the answer to confirm the cluster's *other* members (billing
        only counts time that someone other than a member's own agent vouched for).
        """
        member_id = cmd.member_id
        node = self.nodes.get(member_id)
        if node is None or member_id not in self.info:
            raise RayNodeError(f"member {member_id} is not running here")
        health = await self._probe(member_id, node, max_age=SEEN_MAX_AGE_S)
        if not health.healthy:
            raise RayNodeError(health.detail or "the Ray node is not healthy")
        return MemberSeenReply(alive=list(health.alive_ids))

    async def peer_lost(self, cmd: MemberPeerLost) -> MemberPeerLostReply:
        """Loom declared another member lost: this head's GCS marks its Ray node dead."""
        node = self.nodes.get(cmd.member_id)
        if node is None or cmd.member_id not in self.info:
            raise RayNodeError(f"member {cmd.member_id} is not running here")
        result = await node.mark_peer_dead(cmd.ray_node_id.lower(), cmd.reason)
        self._probed.pop(cmd.member_id, None)  # the GCS's view changed
        if result.get("status") == "dead" and result.get("node_ip"):
            # Calls in flight to it fail now (Ray retries them) instead of at keepalive.
            result["reset"] = await node.reset_connections_to(str(result["node_ip"]))
        log.info("member %s: peer %s marked dead: %s", cmd.member_id, cmd.ray_node_id, result)
        return MemberPeerLostReply.model_validate(result)

    async def _probe(self, member_id: str, node: RayNode, *, max_age: float) -> NodeHealth:
        """The member's GCS probe, reusing one younger than ``max_age`` seconds."""
        cached = self._probed.get(member_id)
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1]
        health = await node.health()
        self._probed[member_id] = (time.monotonic(), health)
        return health

    async def stop_all(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await asyncio.gather(
            *(self.stop(MemberStop(member_id=m)) for m in list(self.nodes)),
            return_exceptions=True,
        )

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            for member_id, node in list(self.nodes.items()):
                if member_id not in self.info:
                    continue  # still starting
                try:
                    health = await self._probe(member_id, node, max_age=HEALTH_INTERVAL_S / 2)
                except Exception as exc:  # a probe failure is not a verdict
                    log.warning("health probe of %s failed: %s", member_id, exc)
                    continue
                if not health.healthy and self.nodes.get(member_id) is node:
                    await self._lost(member_id, node, health.detail or "Ray node died")

    def head_ports(self) -> set[tuple[str, int]]:
        """(host, port) of the Ray dashboard/Jobs API and client server of running heads."""
        allowed: set[tuple[str, int]] = set()
        for member_id, info in self.info.items():
            node = self.nodes.get(member_id)
            if node is None or node.spec.role != "head":
                continue
            for address in (info.dashboard_url, info.client_address):
                parts = urlsplit(address)
                if parts.hostname and parts.port:
                    allowed.add((parts.hostname, parts.port))
        return allowed
