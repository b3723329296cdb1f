"""A supplier's view: `loom worker start` logs what happens to the machine, `loom worker
status` shows it; a SIGTERMed worker reads `drained`, not `offline`. Real coordinator,
real agent process, real Ray in a bubblewrap sandbox."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.config import Settings
from support.servers import AgentProcess, CoordinatorThread, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.settle_interval_s = 1.0
    settings.extra = {**settings.extra, "challenge.cpu_class": "test"}
    return settings


def worker_status(home: Path) -> dict[str, object]:
    env = dict(os.environ, LOOM_HOME=str(home))
    out = subprocess.run(
        [sys.executable, "-m", "loom", "worker", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    data: dict[str, object] = json.loads(out.stdout)
    return data


def test_worker_logs_supplier_events_and_reads_drained_after_sigterm(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> None:
    home = tmp_path / "supplier"
    agent = AgentProcess(home, coordinator.url, "box-1", "--price", "0.5", "--region", "eu-west")
    try:
        wait_for(lambda: "verified: " in agent.log(), 180, "the verified line", 0.5)
        line = next(x for x in agent.log().splitlines() if "verified: " in x)
        assert re.search(r"measured [\d.]+ [kMGT]?OPS \(required [\d.]+ [kMGT]?OPS\)", line)
        assert "sellable at 0.5 credits/device-hour" in line
        client.request("POST", "/v1/credits/deposit", json={"amount": "100"})

        client.create_cluster({"name": "one", "nodes": 1, "resources": {"cpus": 1}})
        first = client.wait_cluster("one", timeout=180)
        assert first.state == "running", first.reason
        wait_for(lambda: f"allocated: cluster {first.id} as head" in agent.log(), 30, "allocated")
        assert "at 0.5 credits/device-hour" in agent.log()
        status = worker_status(home)
        assert status["state"] == "allocated" or status["clusters"], status
        assert status["clusters"] == [{"id": first.id, "role": "head"}]
        # Billed (and so earned) only once the coordinator's probe confirmed the head.
        wait_for(
            lambda: all(m.confirmed for m in client.cluster("one").members), 60, "confirmed", 0.5
        )
        # Time counts between two confirmations (every ~10 s): let a second one come.
        time.sleep(12)
        client.delete_cluster("one")
        wait_for(lambda: f"released: cluster {first.id}" in agent.log(), 60, "released")
        wait_for(lambda: "earnings settled: +" in agent.log(), 60, "earnings settled", 0.5)

        client.create_cluster({"name": "two", "nodes": 1, "resources": {"cpus": 1}})
        second = client.wait_cluster("two", timeout=180)
        assert second.state == "running", second.reason
        wait_for(lambda: f"allocated: cluster {second.id}" in agent.log(), 30, "allocated")
        agent.kill(signal.SIGTERM)
        assert agent.wait(60) == 0
        log = agent.log()
        assert f"drained on SIGTERM: left {second.id}" in log, log[-3000:]
        assert "Traceback" not in log
        status = worker_status(home)
        assert status["state"] == "drained" and status["running"] is False
        assert status["clusters"] == []
        assert float(str(status["earnings_today"])) > 0
        text = subprocess.run(
            [sys.executable, "-m", "loom", "worker", "status"],
            env=dict(os.environ, LOOM_HOME=str(home)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert text.returncode == 0 and "box-1" in text.stdout and ": drained" in text.stdout
        assert "offline" not in text.stdout
        # The user's view says drained too: the node, and why the cluster lost its member.
        node = next(n for n in client.nodes() if n.name == "box-1")
        wait_for(lambda: client.node(node.id).state == "drained", 30, "node drained")
        gone = client.wait_cluster("two", timeout=60)
        assert gone.state == "failed" and "drained" in (gone.reason or ""), gone.reason
        assert "offline" not in (gone.reason or "")

        # Its owner removes it: never listed by default again, its key refused.
        supplier_env = dict(os.environ, LOOM_HOME=str(home), LOOM_COORDINATOR=coordinator.url)
        with pytest.raises(LoomAPIError, match="only its owner"):
            client.remove_node(node.id)  # the user's key does not own it
        out = subprocess.run(
            [sys.executable, "-m", "loom", "node", "remove", node.id, "--json"],
            env=supplier_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["state"] == "removed"
        assert all(n.id != node.id for n in client.nodes())
        assert [n.id for n in client.nodes(state="removed")] == [node.id]
        again = AgentProcess(home, coordinator.url, "box-1", "--region", "eu-west")
        try:
            assert again.wait(60) != 0
            assert "removed by its owner" in again.log(), again.log()[-2000:]
        finally:
            again.ensure_dead()
    finally:
        agent.ensure_dead()
