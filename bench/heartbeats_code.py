"""Which coordinator code bench/heartbeats.py runs: the working tree's, or a git revision's
in a temporary worktree (``--compare REV``), optionally with uvloop hidden from it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Code:
    """Which coordinator to run: the working tree's, or a git worktree's (``--compare``)."""

    label: str
    root: Path = REPO
    #: Run it with uvloop not importable (``--base-without-uvloop``): uvicorn's "auto" loop
    #: then falls back to asyncio's, as before uvloop was a dependency.
    hide_uvloop: bool = False


def hide_uvloop_dir() -> Path:
    """A directory whose ``uvloop`` package fails to import, to put first on PYTHONPATH."""
    where = Path(tempfile.gettempdir()) / "loom-bench-no-uvloop"
    (where / "uvloop").mkdir(parents=True, exist_ok=True)
    (where / "uvloop" / "__init__.py").write_text('raise ImportError("hidden by the bench")\n')
    return where


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A temporary git worktree of ``rev`` (the "before" coordinator of --compare)."""
    where = Path(tempfile.mkdtemp(prefix="loom-bench-hb-base-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
            capture_output=True,
        )
        shutil.rmtree(where, ignore_errors=True)
