"""A process run in the background by a test: its output read as it comes, a pattern
awaited in it, and the whole process group stopped (SIGINT, then SIGKILL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest


@dataclass
class Background:
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def start_reader(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)

        threading.Thread(target=read, daemon=True).start()

    def text(self) -> str:
        return "".join(self.output)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                time.sleep(0.5)
                m = re.search(pattern, self.text())
                if m:
                    return m
                pytest.fail(
                    f"exited with {self.proc.returncode} before {pattern!r}:\n{self.text()}"
                )
            time.sleep(0.3)
        pytest.fail(f"no {pattern!r} within {timeout:.0f} s:\n{self.text()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
