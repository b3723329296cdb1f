"""Gathering confirmations of cluster members (see `services.confirmation` for the rules).

Every `CONFIRM_INTERVAL_S`, for each cluster with ready members on this replica:

1. the head's agent is asked ``member.seen`` {member_id: its head member}: it queries the
   head's GCS and answers the Ray node ids ALIVE there, which confirms the workers;
2. one worker's agent is asked the same for its own member, which confirms the head
   (and the other workers);
3. if no worker confirmed the head (a one-member cluster, or no worker answered), the
   coordinator probes the head itself through the head agent's tunnel: an HTTP request to
   the Ray dashboard for the head's node with a fresh random token must be refused (403)
   and the same request with the cluster's token must list the head's node ALIVE.

An agent only ever speaks about *other* members; a member whose own agent is the only one
saying it is up is not billed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select

from loom.coordinator import tunnel
from loom.coordinator.db.models import Cluster, Member
from loom.coordinator.errors import ServiceError
from loom.coordinator.hub import AgentNotConnected, CommandFailed
from loom.coordinator.loops.isolation import isolated
from loom.coordinator.services import confirmation as svc
from loom.coordinator.state import CoordinatorState
from loom.core.models import MemberState
from loom.protocol.tunnel import data_frame, window_frame

log = logging.getLogger(__name__)

SEEN_TIMEOUT_S = 20.0
PROBE_TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 1 << 20
#: Clusters confirmed at once (each costs the agents one GCS query).
PARALLEL = 8
CONFIRMED_STATES = ("provisioning", "running", "healing")


async def confirm_step(state: CoordinatorState) -> None:
    """One round over the clusters whose members may be billed."""
    async with state.session() as session:
        rows = await session.execute(
            select(Member.cluster_id, Member.node_id)
            .join(Cluster, Cluster.id == Member.cluster_id)
            .where(Cluster.state.in_(CONFIRMED_STATES), Member.state == MemberState.READY.value)
            .distinct()
        )
        # Filtered here: an IN-list of every connected agent would grow with the network.
        here = state.hub.connections
        cluster_ids = sorted({cluster_id for cluster_id, node_id in rows if node_id in here})
    gate = asyncio.Semaphore(PARALLEL)

    async def one(cluster_id: str) -> None:
        # One cluster's trouble never stops the others (logged and counted).
        async with gate, isolated("confirmation", cluster_id):
            await confirm_cluster(state, cluster_id)

    await asyncio.gather(*(one(c) for c in cluster_ids))


async def confirm_cluster(state: CoordinatorState, cluster_id: str) -> list[str]:
    """Gather confirmations of one cluster's ready members now; returns the ids confirmed."""
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        if cluster is None or cluster.state not in CONFIRMED_STATES:
            return []
        members = await svc.ready_members(session, cluster_id)
        token, dashboard = cluster.ray_token, cluster.dashboard_url
    head = next((m for m in members if m.role == "head"), None)
    others = [m for m in members if m is not head]
    confirmed: set[str] = set()
    if head is not None and others:
        confirmed |= await _ask(state, cluster_id, head)
    for worker in others:  # the first worker that answers vouches for the head
        got = await _ask(state, cluster_id, worker)
        confirmed |= got
        if head is not None and head.id in got:
            break
    if (
        head is not None
        and head.id not in confirmed
        and head.node_id not in state.hub.connections
        and head.node_id in state.hub.present
    ):
        return sorted(confirmed)  # another replica holds the head's agent: it probes
    if head is not None and head.id not in confirmed:
        why = await probe_head(state, head, token, dashboard)
        async with state.session() as session:
            fresh = await session.get(Member, head.id)
            if fresh is not None:
                if why is None:
                    svc.record(fresh, time.time(), "the coordinator's probe of the head")
                    confirmed.add(head.id)
                else:
                    svc.refuse(fresh, f"the coordinator's probe of the head failed: {why}")
            await session.commit()
    return sorted(confirmed)


async def _ask(state: CoordinatorState, cluster_id: str, reporter: Member) -> set[str]:
    """Ask `reporter`'s agent which Ray nodes its GCS lists ALIVE; apply the answer."""
    if not state.agents.reachable(reporter.node_id):
        return set()
    try:
        seen = await state.agents.member_seen(reporter.node_id, reporter.id, timeout=SEEN_TIMEOUT_S)
    except (AgentNotConnected, CommandFailed) as exc:
        log.info("member.seen from %s: %s", reporter.node_id, exc)
        return set()
    ids = [str(a)[:64] for a in seen.alive[:10_000]]
    async with state.session() as session:
        done = await svc.apply_seen(
            session, cluster_id, reporter.id, reporter.node_id, ids, time.time()
        )
        await session.commit()
    return set(done)


# -- the coordinator's own probe of a head --------------------------------------------


async def probe_head(
    state: CoordinatorState, head: Member, token: str, dashboard_url: str
) -> str | None:
    """None if the head's Ray dashboard answers as a live head of this cluster; else why."""
    parts = urlsplit(dashboard_url or "")
    if not parts.hostname or not parts.port:
        return "the head reported no Ray dashboard to probe"
    if not head.ray_node_id:
        return "the head reported no Ray node id"
    conn = state.hub.connections.get(head.node_id)
    if conn is None:
        return "the head's agent is not connected"
    link = tunnel.link_for(conn)
    path = f"/nodes/{head.ray_node_id}"
    try:
        wrong, _ = await http_get(
            link, parts.hostname, parts.port, path, f"Bearer {secrets.token_urlsafe(32)}"
        )
        if wrong not in (401, 403):
            return f"a fresh wrong token got HTTP {wrong}, not 403: that is no token-checking head"
        status, body = await http_get(link, parts.hostname, parts.port, path, f"Bearer {token}")
    except (ServiceError, TimeoutError, ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    if status != 200:
        return f"the head answered HTTP {status} with the cluster token"
    try:
        doc = json.loads(body)
    except ValueError:
        return "the head's answer is not JSON"
    if not alive_in(doc, head.ray_node_id):
        return "the head's GCS does not list the head's node ALIVE"
    return None


def alive_in(doc: Any, node_id: str, depth: int = 0) -> bool:
    """Whether a dashboard answer holds ``{"nodeId": node_id, "state": "ALIVE"}`` somewhere."""
    if depth > 8:
        return False
    if isinstance(doc, dict):
        if doc.get("nodeId") == node_id and doc.get("state") == "ALIVE":
            return True
        return any(alive_in(v, node_id, depth + 1) for v in doc.values())
    if isinstance(doc, list):
        return any(alive_in(v, node_id, depth + 1) for v in doc[:1000])
    return False


async def http_get(
    link: tunnel.AgentLink, host: str, port: int, path: str, authorization: str
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET through a tunnel stream: (status, body), bounded in time and size."""
    stream = await link.open(host, port, timeout=PROBE_TIMEOUT_S)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {authorization}\r\n"
        "Accept: application/json\r\nConnection: close\r\n\r\n"
    ).encode()
    raw = bytearray()
    try:
        view = memoryview(request)
        while view:
            n = await asyncio.wait_for(stream.send_window.take(len(view)), PROBE_TIMEOUT_S)
            await link.send(data_frame(stream.id, bytes(view[:n])))
            view = view[n:]
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while len(raw) <= MAX_RESPONSE_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the head's dashboard did not answer in time")
            item = await asyncio.wait_for(stream.inbox.get(), left)
            if not isinstance(item, bytes):
                break  # end of stream (EOF or closed)
            raw += item
            stream.recv_window.release(len(item))
            await link.send(window_frame(stream.id, len(item)))
            if _complete(bytes(raw)):
                break
    finally:
        stream.finish()
        await link.tell_close(stream.id, "probe done")
    return parse_response(bytes(raw))


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip() or b"0")
    return False


def parse_response(raw: bytes) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no HTTP answer from the head's dashboard")
    lines = head.split(b"\r\n")
    fields = lines[0].split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ValueError("not an HTTP answer")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        body = body[: int(headers[b"content-length"])]
    return int(fields[1]), body


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)
