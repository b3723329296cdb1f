"""`loom cluster up|list|status|down` and money at each decision point, against a real
coordinator with protocol-level fake GPU agents (in-process runner, real HTTP)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.client.cli.runner import run
from loom.entry import full_app
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(full_app(), args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_confirmation_cost_and_refund(
    coordinator: CoordinatorThread,
    fakes: FakeAgents,
    loom_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = ["--coordinator", coordinator.url]
    # No capacity yet: the plan names the reason; --retry-until-up waits, then gives up.
    code, _out, err = _run([*url, "cluster", "up", "--nodes", "2", "--gpu", "rtx4090"], capsys)
    assert code == 1 and "no_capacity" in err and "rtx4090" in err
    t0 = time.monotonic()
    code, _out, err = _run(
        [*url, "cluster", "up", "--nodes", "2", "--gpu", "rtx4090", "--retry-until-up",
         "--timeout", "8", "--yes"],
        capsys,
    )  # fmt: skip
    assert code == 1 and "retrying every 5 s" in err and time.monotonic() - t0 >= 5

    for name, price in (("gpu-a", "0.40"), ("gpu-b", "0.50")):
        fakes.add(name, gpus=["rtx4090"], price=price, region="eu-west")
    coordinator.run_coro(
        force_available(coordinator.state.sessions, [n.node_id for n in fakes.nodes])
    )
    assert _run([*url, "credits", "deposit", "100"], capsys)[0] == 0
    spec = [*url, "cluster", "up", "--name", "m", "--nodes", "2", "--gpu", "rtx4090"]
    code, out, _err = _run([*spec, "--duration", "2h", "--dry-run"], capsys)
    assert code == 0, out
    assert "plan for m: 2 node(s)" in out and "gpu-a" in out and "gpu-b" in out
    assert "0.9 credits/hour, 1.8 for the duration" in out
    assert "escrow   1.8 credits held" in out and "balance  100 credits" in out
    code, out, _err = _run([*spec, "--duration", "2h", "--dry-run", "--json"], capsys)
    assert code == 0 and json.loads(out)["escrow"] == "1.8"
    code, out, _err = _run([*url, "cluster", "list", "--json"], capsys)
    assert json.loads(out) == []  # --dry-run created nothing

    code, out, err = _run([*spec, "--duration", "2h", "--yes"], capsys)  # stdin: no terminal
    assert code == 0, err
    assert "is running" in out and "loom cluster down m" in out
    code, out, _err = _run([*url, "cluster", "list"], capsys)
    assert code == 0 and "escrow left" in out and "1.8" in out
    code, out, _err = _run([*url, "cluster", "status", "m", "--json"], capsys)
    cost = json.loads(out)["cost"]
    assert cost["escrowed"] == "1.8" and cost["refunded"] == "0"
    # Fake agents' time is never confirmed by another party, so nothing is billed: the
    # whole escrow comes back (real agents' earnings: test_worker_supplier, test_readme).
    code, out, _err = _run([*url, "cluster", "down", "m", "--json"], capsys)
    assert code == 0
    down = json.loads(out)
    assert down["state"] == "terminated"
    money = down["cost"]
    spent, refunded = float(money["spent"]), float(money["refunded"])
    assert spent >= 0 and abs(spent + refunded - 1.8) < 1e-6, money
    assert float(money["suppliers_earned"]) + float(money["platform_fee"]) == pytest.approx(spent)
    balance = json.loads(_run([*url, "credits", "balance", "--json"], capsys)[1])
    assert float(balance["balance"]) == pytest.approx(100 - spent)


def test_cluster_up_asks_on_a_terminal(
    coordinator: CoordinatorThread, fakes: FakeAgents, tmp_path: Path
) -> None:
    """On a terminal `cluster up` shows the plan and asks; answering no creates nothing."""
    fakes.add("cpu-a", cpu_cores=2, price="0.30")
    coordinator.run_coro(
        force_available(coordinator.state.sessions, [n.node_id for n in fakes.nodes])
    )
    env = dict(os.environ, LOOM_HOME=str(tmp_path / "h"), LOOM_COORDINATOR=coordinator.url)
    assert (
        subprocess.run(
            [sys.executable, "-m", "loom", "credits", "deposit", "10"], env=env, timeout=60
        ).returncode
        == 0
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "cluster", "up", "--nodes", "1", "--cpus", "1"],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    while b"create it?" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            seen += os.read(leader, 4096)
    assert b"create it?" in seen and b"escrow" in seen, seen
    os.write(leader, b"n\n")
    assert proc.wait(60) == 1
    with contextlib.suppress(OSError):
        while select.select([leader], [], [], 0.5)[0]:
            chunk = os.read(leader, 4096)
            if not chunk:
                break
            seen += chunk
    os.close(leader)
    assert b"not created" in seen
    listed = subprocess.run(
        [sys.executable, "-m", "loom", "cluster", "list", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(listed.stdout) == []
