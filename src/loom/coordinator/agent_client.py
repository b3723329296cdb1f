"""The coordinator's typed way to command agents: ``state.agents``.

Every command is a model of :mod:`loom.protocol.commands`; its reply comes back parsed
into the command's reply model. One generic :meth:`AgentClient.call` (await the ack) and
:meth:`AgentClient.notify` (fire and forget) sit on one small transport,
:meth:`AgentClient._send` / :meth:`AgentClient._post`, which reach the agent's socket in
this process's hub. A replica that does not hold the socket overrides those two to route
the command elsewhere (the frame on the wire is the same ``Command``/``Ack`` either way).

Errors: :class:`~loom.coordinator.hub.AgentNotConnected` (no socket for that node) and
:class:`~loom.coordinator.hub.CommandFailed` (a negative ack, no ack in time, or a reply
that does not parse).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from loom.coordinator.hub import AgentHub, CommandFailed
from loom.core.challenge import OpeningsResponse
from loom.protocol.commands import (
    AgentCommand,
    BadCommand,
    ChallengeAbort,
    ChallengeAccepted,
    ChallengeNonce,
    ChallengeOpen,
    ChallengeStart,
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
    parse_reply,
)
from loom.protocol.messages import Ack

R = TypeVar("R", bound=BaseModel)

#: How long one member may take to start and join (ray start + registration).
MEMBER_START_TIMEOUT_S = 90.0
MEMBER_STOP_TIMEOUT_S = 30.0
MEMBER_SYNC_TIMEOUT_S = 60.0
MEMBER_SEEN_TIMEOUT_S = 20.0
DEFAULT_TIMEOUT_S = 30.0


class AgentClient:
    """Typed commands to agents, by node id."""

    def __init__(self, hub: AgentHub) -> None:
        self.hub = hub

    # -- the transport (override to route to another replica) ----------------------------

    def reachable(self, node_id: str) -> bool:
        """Whether a command for ``node_id`` can be delivered now (its agent is connected)."""
        return self.hub.is_connected(node_id)

    async def _send(self, node_id: str, name: str, args_json: str, timeout: float) -> Ack:
        """Deliver one command and return its ack (positive or negative)."""
        return await self.hub.get(node_id).request(name, args_json, timeout=timeout)

    async def _post(self, node_id: str, name: str, args_json: str) -> None:
        """Deliver one command whose ack nobody awaits."""
        await self.hub.get(node_id).post(name, args_json)

    # -- generic -----------------------------------------------------------------------------

    async def call(
        self, node_id: str, command: AgentCommand[R], *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> R:
        """Send ``command`` to ``node_id``'s agent and return its typed reply."""
        name = command.wire_name
        ack = await self._send(node_id, name, command.args_json(), timeout)
        if not ack.ok:
            raise CommandFailed(f"{name} on node {node_id}: {ack.error}")
        try:
            return parse_reply(command, ack.result)
        except BadCommand as exc:
            raise CommandFailed(f"node {node_id} answered badly: {exc}") from None

    async def notify(self, node_id: str, command: AgentCommand[Any]) -> None:
        """Send ``command`` without waiting for its ack."""
        await self._post(node_id, command.wire_name, command.args_json())

    # -- members -------------------------------------------------------------------------

    async def member_start(
        self, node_id: str, command: MemberStart, *, timeout: float = MEMBER_START_TIMEOUT_S
    ) -> MemberStarted:
        return await self.call(node_id, command, timeout=timeout)

    async def member_stop(
        self, node_id: str, member_id: str, *, timeout: float = MEMBER_STOP_TIMEOUT_S
    ) -> MemberStopped:
        return await self.call(node_id, MemberStop(member_id=member_id), timeout=timeout)

    async def member_sync(
        self, node_id: str, members: list[str], *, timeout: float = MEMBER_SYNC_TIMEOUT_S
    ) -> MemberSynced:
        return await self.call(node_id, MemberSync(members=members), timeout=timeout)

    async def member_seen(
        self, node_id: str, member_id: str, *, timeout: float = MEMBER_SEEN_TIMEOUT_S
    ) -> MemberSeenReply:
        return await self.call(node_id, MemberSeen(member_id=member_id), timeout=timeout)

    async def member_peer_lost(
        self, node_id: str, command: MemberPeerLost, *, timeout: float = MEMBER_SEEN_TIMEOUT_S
    ) -> MemberPeerLostReply:
        """Ask the head member's agent to have its GCS mark a lost member's node dead."""
        return await self.call(node_id, command, timeout=timeout)

    # -- the overlay -----------------------------------------------------------------------

    async def member_overlay_key(
        self, node_id: str, cluster_id: str, member_id: str, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> MemberOverlayKeyReply:
        command = MemberOverlayKey(cluster_id=cluster_id, member_id=member_id)
        return await self.call(node_id, command, timeout=timeout)

    async def member_overlay_cert(
        self, node_id: str, command: MemberOverlayCert, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> MemberOverlayCertReply:
        return await self.call(node_id, command, timeout=timeout)

    async def member_overlay_blocklist(
        self, node_id: str, command: MemberOverlayBlocklist, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> MemberOverlayBlocklistReply:
        """The cluster's full blocklist to its members on ``node_id`` (each reloads Nebula)."""
        return await self.call(node_id, command, timeout=timeout)

    # -- hardware challenges ---------------------------------------------------------------

    async def challenge_start(
        self, node_id: str, command: ChallengeStart, *, timeout: float
    ) -> ChallengeAccepted:
        return await self.call(node_id, command, timeout=timeout)

    async def challenge_nonce(self, node_id: str, command: ChallengeNonce) -> None:
        await self.notify(node_id, command)

    async def challenge_open(
        self, node_id: str, command: ChallengeOpen, *, timeout: float
    ) -> OpeningsResponse:
        return await self.call(node_id, command, timeout=timeout)

    async def challenge_abort(self, node_id: str, challenge_id: bytes) -> None:
        await self.notify(node_id, ChallengeAbort(challenge_id=challenge_id))
