"""Unsigned routes: health."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from loom.coordinator.api.deps import StateDep
from loom.protocol.api import Health
from loom.protocol.version import PROTOCOL_VERSION

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz(state: StateDep) -> Health:
    try:
        async with state.session() as session:
            await session.execute(text("SELECT 1"))
        db = "ok"
    except Exception as exc:  # report, don't crash: health is for humans and probes
        db = f"error: {type(exc).__name__}"
    return Health(
        status="ok" if db == "ok" else "degraded",
        version="0.1.0",
        protocol=PROTOCOL_VERSION,
        database=db,
    )
