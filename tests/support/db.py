"""Isolated databases for tests: a fresh SQLite file, or a fresh PostgreSQL schema.

`LOOM_TEST_DB` selects the backend: `sqlite` (default) or a PostgreSQL URL such as
postgresql://postgres@127.0.0.1:5432/test. Each test gets its own schema there.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def backend() -> str:
    return os.environ.get("LOOM_TEST_DB", "sqlite")


def is_postgres() -> bool:
    return backend().startswith("postgres")


async def _pg(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def isolated_db(tmp_path: Path) -> Iterator[str]:
    """Yield a database URL nobody else uses; drop it afterwards."""
    if not is_postgres():
        yield f"sqlite:///{tmp_path / 'loom.db'}"
        return
    base = backend()
    schema = f"t_{secrets.token_hex(6)}"
    asyncio.run(_pg(base, f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}schema={schema}"
    finally:
        asyncio.run(_pg(base, f'DROP SCHEMA "{schema}" CASCADE'))


@asynccontextmanager
async def isolated_db_async(tmp_path: Path) -> AsyncIterator[str]:
    """:func:`isolated_db` for a test already inside an event loop."""
    if not is_postgres():
        yield f"sqlite:///{tmp_path / 'loom.db'}"
        return
    base = backend()
    schema = f"t_{secrets.token_hex(6)}"
    await _pg(base, f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}schema={schema}"
    finally:
        await _pg(base, f'DROP SCHEMA "{schema}" CASCADE')
