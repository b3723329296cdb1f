"""The README's tour, run verbatim on one embedded network (`loom up`).

Every ```sh block of the "A tour of the CLI" section runs line by line in bash, exactly as
written, except for the placeholders the README names (`URL`, `HEAD`, `JOB_ID`), which are
taken from what earlier commands printed. The ```yaml block is saved under the name the
README gives it. Commands that run until Ctrl-C (`loom up`, `loom cluster forward`,
`loom coordinator serve`, `loom worker start`) start in the background and must become
ready. Each command must exit 0, print no traceback, and show the fields the README
documents. A README change that breaks a command fails this test.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from support.background import Background

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = ("URL", "HEAD", "JOB_ID")
COMMAND_TIMEOUT = 300.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the tour's clusters run Ray in bubblewrap sandboxes: needs root"
    ),
]


@dataclass
class Block:
    lang: str
    text: str
    before: str  # the prose just above the block


def tour_blocks(readme: str) -> list[Block]:
    start = readme.index("## A tour of the CLI")
    end = readme.index("\n## ", start + 1)
    section = readme[start:end]
    blocks: list[Block] = []
    last = 0
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", section, re.S | re.M):
        blocks.append(Block(m.group(1), m.group(2), section[last : m.start()]))
        last = m.end()
    return blocks


def commands(block: Block) -> list[str]:
    """The block's command lines, with backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for line in block.text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            out.append(line.strip())
    return out


def bare(line: str) -> str:
    """A command without its trailing comment, for matching expectations."""
    return re.sub(r"\s+#.*$", "", line).strip()


def _json(out: str) -> object:
    return json.loads(out)


def _nodes_available(out: str) -> bool:
    rows = json.loads(out)
    return len(rows) == 3 and all(r["state"] == "available" for r in rows)


# What each documented command must show: a regex, or a predicate over its stdout.
EXPECT: dict[str, list[str | Callable[[str], bool]]] = {
    "loom key show": [r"^default: [0-9a-f]{64}"],
    "loom key new --name work": [r"created key work"],
    "loom key list": [r"\* default", r"work"],
    "loom config show": [r"coordinator\s+http://127\.0\.0\.1:\d+\s+\(\$LOOM_COORDINATOR\)"],
    "loom nodes": [r"3 node\(s\)", r"local-1", r"eu-central"],
    "loom nodes --state available --json": [_nodes_available],
    "loom credits deposit 50": [r"deposited 50 credits"],
    "loom credits balance --json": [
        lambda out: set(json.loads(out)) == {"balance", "escrowed", "earnings"}
    ],
    "loom offers": [r"3 offer\(s\)", r"0\.3"],
    "loom quote cluster.yaml": [r"credits/hour", r"escrow held at `cluster up`"],
    "loom cluster up cluster.yaml --dry-run": [r"plan for demo", r"escrow", r"local-1"],
    "loom cluster up cluster.yaml --yes": [r"plan for demo", r"is running", r"Ray address:"],
    "loom cluster status demo": [r"running", r"head: \S+:\d+", r"spent:"],
    "loom cluster list": [r"1 cluster\(s\)", r"spent", r"demo"],
    "RAY_AUTH_MODE=token": [],
    "loom cluster exec demo --node 1 -- hostname": [r"\S"],
    "loom job submit demo": [r"submitted job (\S+)"],
    "loom job logs demo JOB_ID --follow": [r"CPU", r"SUCCEEDED"],
    "loom job list demo": [r"SUCCEEDED"],
    "loom cluster down demo": [r"terminated", r"cost", r"refunded", r"suppliers earned"],
    "loom credits history": [r"hold", r"refund", r"deposit"],
    "loom earnings": [r"per node", r"per cluster"],
    "loom payout request 0.001": [r"paid out 0\.001 credits"],
    "loom ledger verify": [],
    "loom evidence list": [],
    "loom --coordinator http://127.0.0.1:8800 nodes": [r"gpu-box-1"],
}

BACKGROUND = {
    "loom up": r"export LOOM_COORDINATOR=(\S+)",
    "loom cluster forward": r"Forwarding; Ctrl-C to stop",
    "loom coordinator serve": r"Uvicorn running on",
    "loom worker start": r"connected as gpu-box-1",
}


def _expectations(line: str) -> list[str | Callable[[str], bool]] | None:
    key = bare(line)
    if key in EXPECT:
        return EXPECT[key]
    for prefix, checks in EXPECT.items():
        if key.startswith(prefix + " ") and prefix in ("loom offers", "loom job submit demo"):
            return checks
        if key.startswith(prefix) and prefix == "RAY_AUTH_MODE=token":
            return checks
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_tour_runs_verbatim(tmp_path: Path) -> None:
    for port in (8265, 10001, 8800):
        assert _port_free(port), f"port {port} is taken: the tour's commands use it"
    blocks = tour_blocks(README.read_text())
    assert any(b.lang == "sh" for b in blocks) and any(b.lang == "yaml" for b in blocks)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_HOME=str(home),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    values: dict[str, str] = {}
    running: dict[str, Background] = {}
    ran: list[str] = []

    def substitute(line: str) -> str:
        for name in PLACEHOLDERS:
            if re.search(rf"\b{name}\b", line):
                assert name in values, f"{line!r} needs {name}, which no earlier command printed"
                line = re.sub(rf"\b{name}\b", values[name], line)
        return line

    def background(line: str, pattern: str) -> Background:
        proc = subprocess.Popen(
            ["bash", "-c", line],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        bg = Background(proc)
        bg.start_reader()
        bg.wait_for(pattern, COMMAND_TIMEOUT)
        return bg

    try:
        for block in blocks:
            if block.lang == "yaml":
                name = re.findall(r"[Ss]ave it as `([^`]+)`", block.before)
                assert name, "the README names the file its yaml block is saved as"
                (tmp_path / name[-1]).write_text(block.text)
                continue
            if block.lang != "sh":
                continue
            for raw in commands(block):
                line = substitute(raw)
                key = bare(raw)
                ran.append(key)
                if key.startswith("export "):
                    var, _, value = key.removeprefix("export ").partition("=")
                    env[var] = substitute(value)
                    continue
                prefix = next((p for p in BACKGROUND if key.startswith(p)), None)
                if prefix is not None:
                    if prefix == "loom coordinator serve" and "loom up" in running:
                        running.pop("loom up").stop()  # one coordinator per $LOOM_HOME
                    bg = background(line, BACKGROUND[prefix])
                    if prefix == "loom up":
                        values["URL"] = bg.wait_for(BACKGROUND[prefix], 1).group(1)
                    if prefix == "loom cluster forward":
                        # The relay answers: the head's dashboard, through the coordinator.
                        answer = httpx.get("http://127.0.0.1:8265/api/version", timeout=30)
                        assert answer.status_code < 500, answer.text
                        bg.stop()
                    else:
                        running[prefix] = bg
                    continue
                started = time.monotonic()
                done = subprocess.run(
                    ["bash", "-c", line],
                    cwd=tmp_path,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT,
                )
                print(f"{time.monotonic() - started:6.1f} s  {line}")
                where = f"README command {raw!r} (ran {line!r})"
                assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stderr}"
                assert "Traceback" not in done.stdout + done.stderr, f"{where}:\n{done.stderr}"
                checks = _expectations(raw)
                assert checks is not None, f"{where}: the test has no expectation for it"
                for check in checks:
                    if isinstance(check, str):
                        m = re.search(check, done.stdout, re.M)
                        assert m, f"{where}: no {check!r} in:\n{done.stdout}"
                    else:
                        assert check(done.stdout), f"{where}: unexpected output:\n{done.stdout}"
                if key.startswith("loom job submit demo"):
                    found = re.search(r"submitted job (\S+)", done.stdout)
                    assert found is not None
                    values["JOB_ID"] = found.group(1)
                if key == "loom cluster up cluster.yaml --yes":
                    found = re.search(r"Ray address:\s+(\S+)", done.stdout)
                    assert found is not None
                    values["HEAD"] = found.group(1)
    finally:
        for bg in running.values():
            bg.stop()
    assert "loom up" in ran[0] and any(k.startswith("loom cluster down") for k in ran)
