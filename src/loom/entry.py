"""The `loom` console script: the client CLI plus the coordinator and worker groups.

This module sits above the three process packages (coordinator, agent, client), which
never import each other; it only composes their command groups.
"""

from __future__ import annotations

from loom import launcher
from loom.agent.cli import app as worker_app
from loom.client.cli.main import app
from loom.client.cli.runner import run
from loom.coordinator.cli import app as coordinator_app

app.add_typer(coordinator_app, name="coordinator")
app.add_typer(worker_app, name="worker")
app.command("up")(launcher.up)


def main() -> None:
    raise SystemExit(run(app))


if __name__ == "__main__":
    main()
