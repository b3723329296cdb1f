"""Upgrading a coordinator that kept the overlay's book as JSON files (before the book
moved into the database, migration 0011): import them once, losing nothing."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from loom.coordinator.db.models import OverlayHolder
from loom.coordinator.overlay.book import Book, add_cert

log = logging.getLogger(__name__)


async def import_files(book: Book, now: float | None = None) -> int:
    """Import the book a coordinator kept as files before it moved here (once).

    ``addresses.json`` and ``blocklist.json`` in the overlay directory become rows
    and are renamed ``*.imported``; returns the holders imported.
    """
    now = time.time() if now is None else now
    directory = book.authority.dir
    book_path, revoked_path = directory / "addresses.json", directory / "blocklist.json"
    if not book_path.exists() and not revoked_path.exists():
        return 0
    raw_book = _read_json(book_path)
    raw_revoked = _read_json(revoked_path)
    imported = 0
    async with book.sessions() as session:
        for holder, v in raw_book.items():
            if not isinstance(v, dict) or not {"cluster", "ip"} <= v.keys():
                continue
            if await session.get(OverlayHolder, str(holder)) is not None:
                continue
            session.add(
                OverlayHolder(
                    holder=str(holder),
                    cluster_id=str(v["cluster"]),
                    ip=str(v["ip"]),
                    pub=str(v.get("pub", "")),
                    expires=float(v.get("expires", 0.0)),
                    lifetime=float(v.get("lifetime", 0.0)),
                )
            )
            for fp, expires in v.get("certs", ()):
                if float(expires) > now:
                    await add_cert(
                        session,
                        str(fp),
                        str(holder),
                        str(v["cluster"]),
                        str(v["ip"]),
                        float(expires),
                    )
            imported += 1
        for fp, v in raw_revoked.items():
            if not isinstance(v, dict) or not {"cluster", "holder", "expires"} <= v.keys():
                continue
            if float(v["expires"]) <= now:
                continue
            await add_cert(
                session,
                str(fp),
                str(v["holder"]),
                str(v["cluster"]),
                str(v.get("ip", "")),
                float(v["expires"]),
                revoked_at=now,
            )
        await session.commit()
    for path in (book_path, revoked_path):
        with contextlib.suppress(OSError):
            path.replace(path.with_suffix(".imported"))
    log.info("overlay: imported %d holder(s) from %s into the database", imported, directory)
    return imported


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
