"""The challenge flow over a raw WebSocket agent: honest, lazy and wrongly-signed provers.

The coordinator challenges CPUs with the tiny `test` class here, so a challenge takes
milliseconds. A lazy prover's wrong digest under its signed root becomes evidence, the node
is banned and can never reconnect, and the evidence re-checks offline with
`loom evidence verify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from loom.agent.prover import NumpyProver, Prover, Signer
from loom.client.cli.main import app as cli_app
from loom.client.sdk import LoomClient
from loom.coordinator.challenger import Challenger
from loom.coordinator.config import Settings
from loom.coordinator.loops.challenger import challenger_step, recheck_probability
from loom.core.challenge import (
    ChallengeSpec,
    ChallengeStart,
    NonceRelease,
    OpeningsRequest,
    verify_evidence,
)
from loom.core.challenge.digest import DigestArray
from loom.protocol.identity import KeyPair
from loom.protocol.messages import CLOSE_BANNED
from support.rawagent import auth_message, open_raw
from support.servers import CoordinatorThread, wait_for

ProverFactory = Callable[[ChallengeSpec, Signer], Prover]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.extra["challenge.cpu_class"] = "test"
    return settings


class LazyProver(NumpyProver):
    """Commits to digests it never computed: every tile is wrong (f = 0)."""

    def round_digests(self, rseed: bytes, round_index: int) -> DigestArray:
        return super().round_digests(rseed, round_index) ^ np.uint32(0x5A5A)


class RawProverAgent:
    """A hand-driven agent that answers challenges with the prover it is given."""

    def __init__(
        self, url: str, node: KeyPair, owner: KeyPair, make: ProverFactory, signer: KeyPair
    ) -> None:
        self.url, self.node, self.owner, self.make, self.signer = url, node, owner, make, signer
        self.provers: dict[bytes, Prover] = {}
        self.closed_with: int | None = None
        self.node_id = ""

    async def connect(self) -> ClientConnection:
        ws, hello = await open_raw(self.url)
        await ws.send(json.dumps(auth_message(hello["nonce"], self.node, self.owner)))
        connection: ClientConnection = ws
        return connection

    async def serve(self, ws: ClientConnection) -> None:
        try:
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "welcome":
                    self.node_id = msg["node_id"]
                elif msg["type"] == "command":
                    result = self.handle(msg["name"], msg["args"])
                    await ws.send(
                        json.dumps({"type": "ack", "id": msg["id"], "ok": True, "result": result})
                    )
                    for commit in self.pending_commits():
                        report = {"type": "report", "kind": "challenge.commit", "data": commit}
                        await ws.send(json.dumps(report))
        except ConnectionClosed as exc:
            self.closed_with = exc.rcvd.code if exc.rcvd else None

    def handle(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "challenge.start":
            start = ChallengeStart.model_validate(args)
            prover = self.make(start.spec, self.signer.sign)
            prover.add_start(start)
            self.provers[start.spec.challenge_id] = prover
        elif name == "challenge.nonce":
            release = NonceRelease.model_validate(args)
            self.provers[release.challenge_id].add_nonce(release)
        elif name == "challenge.open":
            request = OpeningsRequest.model_validate(args)
            return self.provers[request.challenge_id].answer(request).model_dump(mode="json")
        return {}

    def pending_commits(self) -> list[dict[str, Any]]:
        out = []
        for prover in self.provers.values():
            while (commit := prover.prove_next()) is not None:
                out.append(commit.model_dump(mode="json"))
        return out


async def _run_agent(
    coordinator: CoordinatorThread, make: ProverFactory, *, sign_with: KeyPair | None = None
) -> tuple[RawProverAgent, asyncio.Task[None], ClientConnection]:
    node, owner = KeyPair.generate(), KeyPair.generate()
    agent = RawProverAgent(coordinator.url, node, owner, make, sign_with or node)
    ws = await agent.connect()
    task = asyncio.create_task(agent.serve(ws))
    return agent, task, ws


def _challenger(coordinator: CoordinatorThread) -> Challenger:
    challenger = coordinator.app.state.challenger
    assert isinstance(challenger, Challenger)
    return challenger


async def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: wait_for(predicate, timeout, what))


async def test_honest_prover_verifies_and_is_rechallenged_at_random(
    coordinator: CoordinatorThread, client: LoomClient
) -> None:
    _agent, task, ws = await _run_agent(coordinator, NumpyProver)
    try:
        node = await _wait(
            lambda: (ns := client.nodes()) and ns[0].state == "available" and ns[0], 20, "verified"
        )
        assert node.devices[0].state == "verified"
        [first] = client.node_challenges(node.id)
        assert first.passed and first.trigger == "initial" and first.device_class == "test"
        assert first.measured_rate is not None and first.measured_rate >= first.required_rate

        # An idle verified device is re-challenged when the Poisson clock fires.
        challenger = _challenger(coordinator)
        plans = coordinator.run_coro(challenger_step(challenger, rng=lambda: 0.0))
        assert plans == {node.id: [(f"{node.id}:cpu", "recheck")]}
        history = await _wait(
            lambda: len(h := client.node_challenges(node.id)) == 2 and h, 20, "the re-challenge"
        )
        assert history[0].trigger == "recheck" and history[0].passed
        assert client.node(node.id).state == "available"
        # …and not when it does not.
        assert coordinator.run_coro(challenger_step(challenger, rng=lambda: 0.999999)) == {}
    finally:
        await ws.close()
        with contextlib.suppress(Exception):
            await task


def test_recheck_rate_keeps_verification_under_the_budget() -> None:
    # A 2 s challenge at a 1 % budget: one every ~200 s on average.
    p = recheck_probability(2.0, duration_s=2.0, budget=0.01)
    assert p == pytest.approx(1 - np.exp(-0.01), rel=1e-9)
    assert recheck_probability(0.0, 2.0, 0.01) == 0.0


async def test_lazy_prover_leaves_evidence_gets_banned_and_cannot_come_back(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> None:
    agent, task, _ws = await _run_agent(coordinator, LazyProver)
    await asyncio.wait_for(task, 20)  # the coordinator closes the connection
    assert agent.closed_with == CLOSE_BANNED
    [node] = client.nodes()
    assert node.state == "banned"
    assert node.devices[0].state == "failed"
    [run] = client.node_challenges(node.id)
    assert not run.passed and run.evidence and "signed fraud evidence" in run.reason

    # Reconnecting is refused at the handshake.
    again = RawProverAgent(coordinator.url, agent.node, agent.owner, NumpyProver, agent.node)
    ws2 = await again.connect()
    await asyncio.wait_for(again.serve(ws2), 10)
    assert again.closed_with == CLOSE_BANNED

    # Anyone can download the evidence and re-check it offline.
    items = client.evidence(node=node.id)
    assert items and all(i.node_key == agent.node.public_hex for i in items)
    proven, why = verify_evidence(items[0].evidence)
    assert proven, why
    good = tmp_path / "evidence.json"
    good.write_text(json.dumps(items[0].evidence))
    result = CliRunner().invoke(cli_app, ["evidence", "verify", str(good)])
    assert result.exit_code == 0, result.output
    assert "PROVEN" in result.output

    # A forged file (another key's signature) does not hold.
    forged = dict(items[0].evidence)
    forged["node_public_key"] = KeyPair.generate().public_hex
    bad = tmp_path / "forged.json"
    bad.write_text(json.dumps(forged))
    result = CliRunner().invoke(cli_app, ["evidence", "verify", str(bad)])
    assert result.exit_code == 1
    assert CliRunner().invoke(cli_app, ["evidence", "verify", str(tmp_path / "no")]).exit_code == 2


async def test_root_signed_by_another_key_fails_without_evidence(
    coordinator: CoordinatorThread, client: LoomClient
) -> None:
    agent, task, ws = await _run_agent(coordinator, NumpyProver, sign_with=KeyPair.generate())
    try:
        node = await _wait(
            lambda: (ns := client.nodes()) and ns[0].devices[0].state == "failed" and ns[0],
            20,
            "the device to fail",
        )
        [run] = client.node_challenges(node.id)
        assert not run.passed and not run.evidence
        assert "not signed by the node's key" in run.reason
        assert node.state == "verifying"  # its CPU is not verified: nothing to sell
        assert client.evidence(node=node.id) == []
        assert agent.closed_with is None  # not banned: a bad signature proves nothing
    finally:
        await ws.close()
        with contextlib.suppress(Exception):
            await task
