"""Runtimes: how a member's command runs on a supplier's machine (DESIGN.md §5 Workloads).

``select_runtime(None)`` gives the default: bubblewrap on Linux when it is installed and
works. The plain ``process`` runtime (no isolation) is only ever used when named.
"""

from __future__ import annotations

import sys

from loom.agent.runtimes.base import (
    MARKER_ENV,
    LeftoverProcessesError,
    ProcessHandle,
    RunSpec,
    Runtime,
    RuntimeUnavailable,
    SandboxError,
    find_marked,
    find_sandboxes,
    sweep,
)
from loom.agent.runtimes.bwrap import BwrapRuntime, probe_bwrap
from loom.agent.runtimes.docker import DockerRuntime, probe_docker
from loom.agent.runtimes.process import ProcessRuntime

RUNTIME_NAMES = ("bwrap", "docker", "process")

__all__ = [
    "MARKER_ENV",
    "RUNTIME_NAMES",
    "BwrapRuntime",
    "DockerRuntime",
    "LeftoverProcessesError",
    "ProcessHandle",
    "ProcessRuntime",
    "RunSpec",
    "Runtime",
    "RuntimeUnavailable",
    "SandboxError",
    "find_marked",
    "find_sandboxes",
    "probe_bwrap",
    "probe_docker",
    "select_runtime",
    "sweep",
]


def select_runtime(name: str | None = None, *, docker_image: str | None = None) -> Runtime:
    """The runtime called ``name``, or the default one when ``name`` is None.

    The default is bubblewrap on Linux; if it is missing or cannot sandbox here, this
    raises :class:`RuntimeUnavailable` saying how to install it — it never falls back
    to the unisolated ``process`` runtime on its own.
    """
    if name is None:
        if not sys.platform.startswith("linux"):
            raise RuntimeUnavailable(
                f"no default sandbox on {sys.platform}: bubblewrap needs Linux; "
                "choose `docker`, or `process` (no isolation) explicitly"
            )
        return BwrapRuntime()
    key = name.strip().lower()
    if key in ("bwrap", "bubblewrap"):
        return BwrapRuntime()
    if key == "docker":
        return DockerRuntime(image=docker_image)
    if key == "process":
        return ProcessRuntime()
    raise ValueError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIME_NAMES)}")
