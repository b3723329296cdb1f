"""The plain-process runtime: no isolation, only process-tree control.

Used only when asked for by name (tests, machines without bubblewrap, debugging). The
command runs as a direct child of the agent in its own session and process group, with a
clean environment (only what the RunSpec says, plus the marker), and on Linux with
``PR_SET_PDEATHSIG`` so that it dies if the agent thread that spawned it dies. It can read
and write whatever the agent's user can; GPUs are restricted only by
``CUDA_VISIBLE_DEVICES``, which user code can change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from loom.agent.runtimes.base import (
    ProcessHandle,
    RunSpec,
    Runtime,
    SandboxError,
    open_log,
)

_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec function that asks the kernel to SIGKILL the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(libc_name, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


class ProcessRuntime(Runtime):
    """Runs the command as a plain child process (own session, clean env)."""

    name = "process"
    uses_host_python = True

    def spawn(self, spec: RunSpec) -> ProcessHandle:
        spec.cwd.mkdir(parents=True, exist_ok=True)
        log_fd = open_log(spec)
        try:
            popen = subprocess.Popen(
                list(spec.argv),
                env=spec.full_env(),
                cwd=str(spec.cwd),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_pdeathsig_preexec(),  # only calls prctl(): safe after fork
            )
        except OSError as exc:
            raise SandboxError(f"could not start {spec.argv[0]!r}: {exc}") from exc
        finally:
            os.close(log_fd)
        return ProcessHandle(popen, spec)
