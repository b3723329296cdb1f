"""Dependencies shared by the routers: the coordinator state, sessions, the signed caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.services import auth as auth_service
from loom.coordinator.state import CoordinatorState


def get_state(request: Request) -> CoordinatorState:
    state: CoordinatorState = request.app.state.loom
    return state


StateDep = Annotated[CoordinatorState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def signed_path(scope: Mapping[str, Any]) -> str:
    """The path as it was sent (still percent-encoded): what the signature covers."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw.split(b"?", 1)[0].decode("latin-1")
    return str(scope.get("path", ""))


async def signed_caller(request: Request, state: StateDep) -> str:
    """Verify the request signature; returns the caller's public key (their account)."""
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    async with state.session() as session:
        key = await auth_service.verify_request(
            session,
            method=request.method,
            path=signed_path(request.scope),
            query=request.url.query,
            body=body,
            headers=headers,
            max_skew_s=state.settings.max_clock_skew_s,
        )
        await session.commit()
    return key


CallerDep = Annotated[str, Depends(signed_caller)]
