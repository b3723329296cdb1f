"""Hardware verification (signed): a node's challenge history, and fraud evidence."""

from __future__ import annotations

from fastapi import APIRouter, Query

from loom.coordinator.api.deps import CallerDep, SessionDep
from loom.coordinator.services import verification as verification_service
from loom.protocol.verification import ChallengeOut, EvidenceOut

router = APIRouter(prefix="/v1", tags=["verification"])


@router.get("/nodes/{node_id}/challenges", response_model=list[ChallengeOut])
async def node_challenges(
    node_id: str,
    session: SessionDep,
    _caller: CallerDep,
    limit: int = Query(default=100, ge=1, le=1000, description="newest first"),
) -> list[ChallengeOut]:
    """The node's hardware challenges, newest first, with measured rates and verdicts."""
    return await verification_service.history(session, node_id, limit)


@router.get("/evidence", response_model=list[EvidenceOut])
async def evidence(
    session: SessionDep,
    _caller: CallerDep,
    node: str | None = Query(default=None, description="only this node's evidence"),
    limit: int = Query(default=100, ge=1, le=1000, description="newest first"),
) -> list[EvidenceOut]:
    """Fraud evidence: each item's `evidence` re-checks offline with `loom evidence verify`."""
    return await verification_service.list_evidence(session, node_id=node, limit=limit)
