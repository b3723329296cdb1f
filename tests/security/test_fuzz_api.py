"""Schemathesis over the coordinator's own `/openapi.json`, against a real coordinator.

Every operation gets bounded examples, valid and invalid (positive and negative generation),
sent signed with a fresh key through the SDK's `SigningAuth` (so signed routes are really
exercised, not stopped at 401). The bar: zero server errors (5xx) and no stack trace in any
body; every refusal is the JSON error shape. With a handful of fake agents and a funded
account there is something to find behind the signature (nodes, offers, clusters).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from loom.client.sdk import LoomClient, SigningAuth
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread

#: Examples per operation and generation mode (28 operations × 2 modes).
EXAMPLES = 12
SKIP = {("GET", "/metrics")}


def _operations(url: str) -> list[Any]:
    spec = httpx.get(f"{url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    ops = [result.ok() for result in schema.get_all_operations()]
    return [op for op in ops if (op.method.upper(), op.path) not in SKIP]


def test_no_input_from_the_schema_makes_a_server_error(coordinator: CoordinatorThread) -> None:
    url = coordinator.url
    key = KeyPair.generate()
    agents = FakeAgents(url)
    try:
        nodes = [agents.add(f"fz{i}", cpu_cores=4).node_id for i in range(2)]
        coordinator.run_coro(force_available(coordinator.state.sessions, nodes))
        with LoomClient(url, key) as c:
            c.deposit("1000")
            c.create_cluster({"name": "fz", "nodes": 1, "resources": {"cpus": 1}})
        ops = _operations(url)
        assert len(ops) >= 20
        statuses: Counter[int] = Counter()
        failures: list[str] = []
        started = time.monotonic()
        with httpx.Client(auth=SigningAuth(key), timeout=30) as http:
            for op in ops:
                for mode in schemathesis.GenerationMode:
                    _fuzz(http, url, op, mode, statuses, failures)
        elapsed = time.monotonic() - started
        assert not failures, "\n".join(failures[:10])
        assert sum(statuses.values()) >= len(ops) * 4
        assert statuses[200] + statuses[201] > 0  # signed requests got through
        assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        print(f"fuzzed {sum(statuses.values())} requests in {elapsed:.1f} s: {dict(statuses)}")
    finally:
        agents.close()


def _fuzz(
    http: httpx.Client,
    url: str,
    op: Any,
    mode: schemathesis.GenerationMode,
    statuses: Counter[int],
    failures: list[str],
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        kw = case.as_transport_kwargs(base_url=url)
        headers = {
            k: v
            for k, v in kw.get("headers", {}).items()
            if k.lower() not in ("content-length", "host") and k.lower().isascii()
        }
        request: dict[str, Any] = {
            "method": kw["method"],
            "url": kw["url"],
            "params": kw.get("params"),
            "headers": headers,
        }
        if "json" in kw:
            request["content"] = json.dumps(kw["json"]).encode()
            headers["content-type"] = "application/json"
        elif "data" in kw:
            request["content"] = kw["data"]
        try:
            response = http.request(**request)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
            return  # not sendable over HTTP at all (the client library refuses it)
        statuses[response.status_code] += 1
        where = f"{kw['method']} {response.request.url} [{mode.value}]"
        if response.status_code == 401:  # signed by SigningAuth: any path, any query
            failures.append(f"{where}: 401 {response.text[:200]}")
        if response.status_code >= 500:
            failures.append(f"{where}: {response.status_code} {response.text[:300]}")
        if "Traceback" in response.text or 'File "' in response.text:
            failures.append(f"{where}: a stack trace in the body")
        if response.status_code >= 400 and response.headers.get("content-type", "").startswith(
            "application/json"
        ):
            body = response.json()
            if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
                failures.append(f"{where}: error body without the error shape: {body!r:.200}")

    # Unsatisfiable: nothing to make invalid (an operation without parameters or body).
    with contextlib.suppress(Unsatisfiable):
        run()


@pytest.mark.parametrize("query", ["limit=1&limit=2", "after=" + "9" * 40, "q=" + "%ff" * 10])
def test_public_routes_refuse_odd_queries_cleanly(
    coordinator: CoordinatorThread, query: str
) -> None:
    r = httpx.get(f"{coordinator.url}/v1/ledger/transactions?{query}", timeout=10)
    assert 400 <= r.status_code < 500 or r.status_code == 200, r.text
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 50_000 + b"]" * 50_000,
        b'{"amount": "\\ud800"}',
        b'{"amount": ' + b"9" * 5000 + b"}",
        b"\xff\xfe",
    ],
    ids=["deep", "surrogate", "huge-int", "not-utf8"],
)
def test_hostile_json_bodies_are_a_clean_400(coordinator: CoordinatorThread, body: bytes) -> None:
    key = KeyPair.generate()
    with httpx.Client(auth=SigningAuth(key), timeout=30) as http:
        r = http.post(
            f"{coordinator.url}/v1/credits/deposit",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert 400 <= r.status_code < 500, r.text[:300]
    assert "Traceback" not in r.text and isinstance(r.json().get("error"), dict)
