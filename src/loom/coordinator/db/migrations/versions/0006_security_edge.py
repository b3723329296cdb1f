"""Security at the edge: per-owner unique cluster names and other constraints (issue 14 §2).

* A cluster name is unique per owner among *live* clusters, enforced by the database with a
  partial unique index (PostgreSQL and SQLite both support ``WHERE``), so parallel creates
  of one name cannot all succeed; ended clusters release their name.
* Public keys have one spelling (64 lower-case hex digits). Rows written before the edge
  refused other spellings are normalized here (whitespace removed, lower case), so an old
  upper-case owner key no longer breaks settlement for the clusters after it.
* Live clusters that already share a name (written before the index) keep the oldest one's
  name; the others get their id appended, so the index can be built.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEX = "uq_clusters_owner_live_name"
LIVE_STATES = ("requested", "provisioning", "running", "healing", "terminating")
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_SPACE_RE = re.compile(r"\s+")


def _canonical(key: str) -> str | None:
    """The one spelling of `key`, when it is another spelling of a valid key."""
    fixed = _SPACE_RE.sub("", key).lower()
    fixed = fixed[2:] if fixed.startswith("0x") else fixed
    return fixed if fixed != key and _KEY_RE.fullmatch(fixed) else None


def _normalize_keys(bind: sa.engine.Connection) -> None:
    for table, column in (
        ("nodes", "owner_key"),
        ("nodes", "node_key"),
        ("clusters", "owner_key"),
    ):
        rows = bind.execute(sa.text(f"SELECT DISTINCT {column} FROM {table}")).scalars().all()
        for key in rows:
            fixed = _canonical(str(key))
            if fixed is not None:
                bind.execute(
                    sa.text(f"UPDATE {table} SET {column} = :fixed WHERE {column} = :key"),
                    {"fixed": fixed, "key": key},
                )
    keys = bind.execute(sa.text("SELECT key FROM accounts")).scalars().all()
    present = set(keys)
    for key in keys:
        fixed = _canonical(str(key))
        if fixed is None:
            continue
        if fixed in present:  # the same keypair's canonical account exists: keep that one
            bind.execute(sa.text("DELETE FROM accounts WHERE key = :key"), {"key": key})
        else:
            bind.execute(
                sa.text("UPDATE accounts SET key = :fixed WHERE key = :key"),
                {"fixed": fixed, "key": key},
            )
            present.add(fixed)
    # Nonces live two minutes; any in another spelling can simply go.
    bind.execute(sa.text("DELETE FROM request_nonces WHERE key <> lower(key)"))


def _rename_duplicates(bind: sa.engine.Connection) -> None:
    states = ", ".join(f"'{s}'" for s in LIVE_STATES)
    rows = bind.execute(
        sa.text(
            f"SELECT id, owner_key, name FROM clusters WHERE state IN ({states}) "
            "ORDER BY created_at, id"
        )
    ).all()
    seen: set[tuple[str, str]] = set()
    for cluster_id, owner, name in rows:
        if (owner, name) not in seen:
            seen.add((owner, name))
            continue
        renamed = f"{str(name)[:50].rstrip('-')}-{str(cluster_id).removeprefix('c-')}"[:63]
        bind.execute(
            sa.text("UPDATE clusters SET name = :name WHERE id = :id"),
            {"name": renamed, "id": cluster_id},
        )
        seen.add((owner, renamed))


def upgrade() -> None:
    bind = op.get_bind()
    _normalize_keys(bind)
    _rename_duplicates(bind)
    where = sa.text("state IN (" + ", ".join(f"'{s}'" for s in LIVE_STATES) + ")")
    op.create_index(
        INDEX,
        "clusters",
        ["owner_key", "name"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="clusters")
