"""loom.agent.ray_peer without a cluster: what it refuses and how it reports a dead GCS.

(Marking a real node dead is exercised by tests/integration/test_overlay_heal.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

from loom.agent.ray_peer import mark_dead
from support.servers import free_port

NODE = "ab" * 28


def test_a_bad_node_id_is_refused_before_anything_is_contacted() -> None:
    result = mark_dead(f"127.0.0.2:{free_port()}", "not-a-node", "x")
    assert result["status"] == "error" and "56 hex digits" in result["error"]


def test_a_closed_gcs_port_is_unreachable_at_once() -> None:
    result = mark_dead(f"127.0.0.2:{free_port()}", NODE, "x", timeout=2)
    assert result["status"] == "unreachable" and "does not accept" in result["error"]


def test_the_module_prints_one_json_line_and_fails_without_a_gcs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom.agent.ray_peer",
            f"--gcs=127.0.0.2:{free_port()}",
            f"--node-id={NODE.upper()}",
            "--reason=-starts with a dash",
            "--timeout=2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "unreachable"
