"""The `loom` console script: the client CLI plus the coordinator and worker groups.

This module sits above the three process packages (coordinator, agent, client), which
never import each other; it only composes their command groups. The server-side groups
(`coordinator`, `worker`, `up`) import FastAPI, SQLAlchemy, the agent runtimes… (seconds
on a small machine), so they are added only when the command line may need them: their
name appears, or no client command does (top-level help, completion, a typo).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import typer

from loom.client.cli.main import app
from loom.client.cli.runner import run

# name -> (module, attribute, kind): a typer group or a command function.
SERVER_SIDE = {
    "coordinator": ("loom.coordinator.cli", "app", "group"),
    "worker": ("loom.agent.cli", "app", "group"),
    "up": ("loom.launcher", "up", "command"),
}
_added: set[str] = set()


def add_server_side(names: Sequence[str] = tuple(SERVER_SIDE)) -> typer.Typer:
    """`app` with these server-side groups added (idempotent)."""
    for name in names:
        if name in _added:
            continue
        module, attribute, kind = SERVER_SIDE[name]
        target = getattr(importlib.import_module(module), attribute)
        if kind == "group":
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
        _added.add(name)
    return app


def full_app() -> typer.Typer:
    """The whole command tree (for tests and tools)."""
    return add_server_side()


def _client_names() -> set[str]:
    names = {g.name for g in app.registered_groups if g.name}
    names |= {c.name for c in app.registered_commands if c.name}
    return names


def _needed(args: Sequence[str]) -> tuple[str, ...]:
    if any(k.startswith("_LOOM_COMPLETE") for k in os.environ) or not args:
        return tuple(SERVER_SIDE)
    words = set(args[: list(args).index("--")] if "--" in args else args)
    wanted = tuple(n for n in SERVER_SIDE if n in words)
    if wanted or words & _client_names():
        return wanted
    return tuple(SERVER_SIDE)  # top-level help, --version, a typo: list everything


def main() -> None:
    args = sys.argv[1:]
    raise SystemExit(run(add_server_side(_needed(args)), args))


if __name__ == "__main__":
    main()
