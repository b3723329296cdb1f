"""A stuck agent tells what it is doing: SIGUSR2 writes its asyncio tasks' stacks, SIGUSR1
every thread's stack even while the event loop is blocked (real process, real signals)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

PROGRAM = """
import asyncio, sys, time
from loom.agent import diagnostics

async def waits_for_ever_on_the_network():
    await asyncio.Event().wait()

async def main():
    diagnostics.install(asyncio.get_running_loop())
    asyncio.create_task(waits_for_ever_on_the_network(), name="stuck-member-start")
    print("ready", flush=True)
    await asyncio.sleep(1.5)       # the loop runs: SIGUSR2 is answered here
    time.sleep(3)                  # the loop is blocked: only SIGUSR1 can answer

asyncio.run(main())
"""


def test_signals_dump_task_and_thread_stacks() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR2)
    time.sleep(2.5)  # now inside the blocking time.sleep
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err  # neither signal stops the process
    assert "asyncio tasks" in err and "stuck-member-start" in err
    assert "waits_for_ever_on_the_network" in err
    # faulthandler's dump of the main thread, blocked in the sleep of main()
    assert "Current thread" in err or "Thread 0x" in err, err
    assert "in main" in err, err
