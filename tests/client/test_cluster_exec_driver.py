"""`loom cluster exec`'s driver, on a real (local) Ray: output streams line by line, the
command's exit status is the driver's, and a missing command is exit 127 with the reason."""

from __future__ import annotations

import subprocess
import sys
import time

from loom.client.cli.cluster_exec import DRIVER


def test_exec_driver_streams_lines_and_keeps_the_exit_status() -> None:
    script = "echo first; sleep 3; echo second >&2; exit 3"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", DRIVER, "1", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[tuple[float, str]] = []
    for line in proc.stdout:
        seen.append((time.monotonic() - started, line))
    assert proc.wait(timeout=120) == 3
    assert [line for _, line in seen] == ["first\n", "second\n"]
    # Streamed: the first line arrived while the command was still sleeping.
    assert seen[1][0] - seen[0][0] >= 2.0, seen

    missing = subprocess.run(
        [sys.executable, "-c", DRIVER, "1", "no-such-command-xyz"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 127
    assert "no-such-command-xyz" in missing.stdout
