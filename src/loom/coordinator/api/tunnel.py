"""`GET /v1/clusters/{ref}/tunnel?port=dashboard|client`: a WebSocket carrying one TCP
connection to the head's Ray port (see `loom.protocol.tunnel` and docs/tunnel.md).

The upgrade request is signed like any `/v1` request (X-Loom-* headers over method, path,
query, empty body). Every refusal happens before the upgrade, as an HTTP error with the
usual JSON body: 401 bad signature, 404 not your cluster, 409 not running, 503 head agent
not connected, 502 the head's agent could not connect.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, WebSocket

from loom.coordinator import tunnel
from loom.coordinator.api.deps import get_state, signed_path
from loom.coordinator.api.errors import error_response
from loom.coordinator.errors import ServiceError
from loom.coordinator.services import auth as auth_service

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["tunnel"])


@router.websocket("/clusters/{ref}/tunnel")
async def cluster_tunnel(ws: WebSocket, ref: str) -> None:
    state = get_state(ws)  # type: ignore[arg-type]
    try:
        async with state.session() as session:
            caller = await auth_service.verify_request(
                session,
                method="GET",
                path=signed_path(ws.scope),
                query=ws.url.query,
                body=b"",
                headers={k.lower(): v for k, v in ws.headers.items()},
                max_skew_s=state.settings.max_clock_skew_s,
            )
            await session.commit()
        target = await tunnel.resolve_target(
            state, caller, ref, ws.query_params.get("port", "dashboard")
        )
        stream = await tunnel.open_stream(state, target)
    except ServiceError as exc:
        await ws.send_denial_response(error_response(exc.status, exc.code, exc.message, exc.field))
        return
    try:
        await ws.accept()
    except Exception:
        stream.abort("the user went away")
        await stream.link.tell_close(stream.id, "the user went away")
        raise
    await tunnel.relay(stream, ws)
