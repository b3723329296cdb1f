"""What a stuck agent is doing, on request: the supplier (or a test) sends a signal and the
agent writes its stacks to its log (stderr).

- ``SIGUSR1``: every thread's Python stack, written by :mod:`faulthandler` from the signal
  handler itself, so it works even when the event loop is blocked.
- ``SIGUSR2``: every asyncio task's coroutine stack (what each task is awaiting), written
  by the event loop, so it needs a loop that still runs.

Neither stops the agent, and neither writes anything but stack frames (no member tokens:
frames name files, lines and functions, not values).
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import signal
import sys

THREADS_SIGNAL = signal.SIGUSR1
TASKS_SIGNAL = signal.SIGUSR2


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Register both signals (call once, from the running loop's thread)."""
    faulthandler.register(THREADS_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    loop.add_signal_handler(TASKS_SIGNAL, dump_tasks)


def task_stacks() -> str:
    """The stack of every task of the running loop, one block per task."""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"--- {len(tasks)} asyncio tasks ---\n")
    for task in tasks:
        out.write(f"{task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(limit=12, file=out)
    return out.getvalue()


def dump_tasks() -> None:
    sys.stderr.write(task_stacks())
    sys.stderr.flush()
