"""Database URLs, engines and migrations.

Users give plain URLs (`sqlite:///path`, `postgresql://user@host/db`); the async driver
is chosen here. A `?schema=NAME` query parameter on a PostgreSQL URL selects a schema
(the tests use one schema per test).
"""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class DatabaseURLError(ValueError):
    pass


def normalize_url(url: str) -> tuple[str, dict[str, Any]]:
    """Return (SQLAlchemy async URL, connect_args) for a user-facing database URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    query = dict(parse_qsl(parts.query))
    connect_args: dict[str, Any] = {}
    if scheme == "sqlite":
        scheme_out = "sqlite+aiosqlite"
        connect_args["timeout"] = 30
    elif scheme in ("postgresql", "postgres"):
        scheme_out = "postgresql+asyncpg"
        schema = query.pop("schema", None)
        if schema:
            connect_args["server_settings"] = {"search_path": schema}
    else:
        raise DatabaseURLError(
            f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    rest = url.split("://", 1)[1].split("?", 1)[0]
    encoded = urlencode(query)
    return f"{scheme_out}://{rest}" + (f"?{encoded}" if encoded else ""), connect_args


def is_sqlite(url: str) -> bool:
    return urlsplit(url).scheme.startswith("sqlite")


def create_engine(url: str) -> AsyncEngine:
    async_url, connect_args = normalize_url(url)
    kwargs: dict[str, Any] = {"connect_args": connect_args}
    if not is_sqlite(url):
        kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
    engine = create_async_engine(async_url, **kwargs)
    if is_sqlite(url):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


def _downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(alembic_config(connection), revision)


#: PostgreSQL advisory lock key held while migrating (any value unique to Loom will do).
MIGRATION_LOCK = 0x4C4F4F4D  # "LOOM"


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (the coordinator does this at start).

    Processes starting at once on a fresh database (replicas, or a coordinator and a tool
    on one SQLite file) would each try to create the schema: the first takes a lock and
    migrates; the others wait for its commit, then find the schema at `revision`. The lock
    is a transaction-scoped advisory lock on PostgreSQL, a lock file beside a SQLite file.
    """
    database = engine.url.database or ""
    lock_path = Path(f"{database}.migrate.lock") if engine.dialect.name == "sqlite" else None
    if lock_path is not None and database in ("", ":memory:"):
        lock_path = None
    lock = await asyncio.to_thread(_file_lock, lock_path) if lock_path is not None else None
    try:
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                )
            await conn.run_sync(_upgrade, revision)
    finally:
        if lock is not None:
            lock.close()  # closing the file releases the lock


def _file_lock(path: Path) -> IO[str]:
    """An exclusive lock on ``path`` (created if missing), held until the file is closed."""
    handle = open(path, "a")  # noqa: SIM115 - returned, closed by the caller
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, revision)
