"""The `loom` CLI as a user runs it: real processes, exit codes, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loom.client.sdk import LoomAPIError, LoomClient, LoomConnectionError
from loom.protocol.identity import KeyPair
from support.servers import CoordinatorThread, free_port


def loom(
    home: Path, *args: str, coordinator: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LOOM_HOME=str(home), COLUMNS="200")
    env.pop("LOOM_COORDINATOR", None)
    env.pop("LOOM_KEY", None)
    if coordinator:
        env["LOOM_COORDINATOR"] = coordinator
    return subprocess.run(
        [sys.executable, "-m", "loom", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_key_new_show_list(tmp_path: Path) -> None:
    home = tmp_path / "h"
    made = loom(home, "key", "new", "--name", "work")
    assert made.returncode == 0, made.stderr
    shown = loom(home, "--key", "work", "key", "show", "--json")
    data = json.loads(shown.stdout)
    assert data["name"] == "work" and len(data["public_key"]) == 64
    assert (home / "keys" / "work.key").stat().st_mode & 0o777 == 0o600
    again = loom(home, "key", "new", "--name", "work")
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = loom(home, "--key", "nobody", "key", "show")
    assert missing.returncode == 2 and "loom key new" in missing.stderr
    listed = json.loads(loom(home, "key", "list", "--json").stdout)
    assert [k["name"] for k in listed] == ["work"]


def test_default_key_created_on_first_use(tmp_path: Path) -> None:
    home = tmp_path / "h"
    out = loom(home, "key", "show")
    assert out.returncode == 0 and out.stdout.startswith("default: ")


def test_nodes_json_against_real_coordinator(
    coordinator: CoordinatorThread, tmp_path: Path
) -> None:
    out = loom(tmp_path / "h", "nodes", "--json", coordinator=coordinator.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    table = loom(tmp_path / "h", "--coordinator", coordinator.url, "nodes")
    assert table.returncode == 0 and "0 node(s)" in table.stdout


def test_unreachable_coordinator_exits_3_with_one_line(tmp_path: Path) -> None:
    out = loom(tmp_path / "h", "--coordinator", f"http://127.0.0.1:{free_port()}", "nodes")
    assert out.returncode == 3
    assert "cannot reach the coordinator" in out.stderr
    assert "Traceback" not in out.stderr


def test_api_refusal_exits_1(coordinator: CoordinatorThread, tmp_path: Path) -> None:
    out = loom(tmp_path / "h", "cluster", "status", "nosuch", coordinator=coordinator.url)
    assert out.returncode == 1
    assert "cluster_not_found" in out.stderr and "Traceback" not in out.stderr
    as_json = loom(
        tmp_path / "h", "cluster", "status", "nosuch", "--json", coordinator=coordinator.url
    )
    assert as_json.returncode == 1
    assert json.loads(as_json.stderr)["code"] == "cluster_not_found"


def test_sdk_with_mock_transport_signs_and_maps_errors() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/nodes":
            return httpx.Response(200, json=[])
        return httpx.Response(404, json={"error": {"code": "node_not_found", "message": "no"}})

    key = KeyPair.generate()
    with LoomClient("http://loom.test", key, transport=httpx.MockTransport(handler)) as client:
        assert client.nodes() == []
        with pytest.raises(LoomAPIError) as info:
            client.node("n-x")
    assert info.value.code == "node_not_found"
    assert seen[0].headers["x-loom-key"] == key.public_hex
    assert len(seen[0].headers["x-loom-signature"]) == 128


def test_sdk_connection_error_is_friendly() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with (
        LoomClient("http://x", KeyPair.generate(), transport=httpx.MockTransport(handler)) as c,
        pytest.raises(LoomConnectionError, match="loom coordinator serve"),
    ):
        c.nodes()
