"""Capacity is measured, not claimed (issue 14 §3).

A real agent (the real handshake, the real NumPy prover answering the real ``cpu``-class
challenge) whose inventory claims 64 cores on this small machine. Its CPU passes — it is
a working CPU — but it is offered only the cores its measured throughput supports
(`loom.core.challenge.capacity`), far fewer than 64, and a cluster asking for 64 cores
finds no capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from websockets.asyncio.client import ClientConnection

from loom.agent.config import AgentConfig
from loom.agent.inventory import NoGpus
from loom.agent.main import Agent
from loom.agent.verification import ChallengeHandler
from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.db.models import Device
from loom.core.challenge import params_for
from loom.protocol.identity import KeyPair, agent_auth_message, binding_message
from loom.protocol.messages import Auth, Hello, Inventory, Welcome
from support.servers import CoordinatorThread, wait_for

pytestmark = pytest.mark.slow

CLAIMED = 64
CORE_RATE = params_for("cpu").core_rate or 0.0


class BoastingAgent(Agent):
    """The stock agent, except that its handshake claims `CLAIMED` cores."""

    async def _handshake(self, ws: ClientConnection, real: Inventory) -> Welcome:
        hello = Hello.model_validate_json(await asyncio.wait_for(ws.recv(), 10))
        auth = Auth(
            protocol=self.protocol,
            node_key=self.node_key.public_hex,
            owner_key=self.owner_key.public_hex,
            binding_sig=self.owner_key.sign(binding_message(self.node_key.public_hex)).hex(),
            nonce_sig=self.node_key.sign(agent_auth_message(hello.nonce)).hex(),
            name=self.config.name,
            region=self.config.region,
            price=self.config.price,
            inventory=real.model_copy(update={"cpu_cores": CLAIMED}),
        )
        await ws.send(auth.model_dump_json())
        return Welcome.model_validate_json(await asyncio.wait_for(ws.recv(), 30))


@pytest.fixture
def boaster(coordinator: CoordinatorThread, tmp_path: Path) -> Iterator[BoastingAgent]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = AgentConfig(
        coordinator=coordinator.url,
        name="boaster",
        region="eu-west",
        country="",
        price="0.1",
        work_dir=tmp_path / "boaster",
    )
    agent = BoastingAgent(
        config, node_key=KeyPair.generate(), owner_key=KeyPair.generate(), probe=NoGpus()
    )
    agent.handlers.update(ChallengeHandler(agent).handlers())
    run = asyncio.run_coroutine_threadsafe(agent.run(), loop)
    try:
        yield agent
    finally:
        loop.call_soon_threadsafe(agent.stop)
        with contextlib.suppress(Exception):
            run.result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


async def _cpu(coordinator: CoordinatorThread) -> tuple[int | None, int | None]:
    async with coordinator.state.session() as session:
        dev = await session.scalar(select(Device).where(Device.kind == "cpu"))
        return (None, None) if dev is None else (dev.count, dev.verified_units)


def test_a_node_claiming_64_cores_is_offered_what_it_measured(
    coordinator: CoordinatorThread, client: LoomClient, boaster: BoastingAgent
) -> None:
    wait_for(
        lambda: any(n.state == "available" for n in client.nodes()),
        240,
        "the boasting agent's CPU challenge to pass",
    )
    claimed, measured = coordinator.run_coro(_cpu(coordinator))
    challenges = client.node_challenges(client.nodes()[0].id)
    passed = next(c for c in challenges if c.outcome == "passed")
    offered = sum(o.cpus for o in client.offers() if o.gpu == "cpu")
    print(
        f"\nclaimed {claimed} cores on a {os.cpu_count()}-core machine; measured "
        f"{passed.measured_rate:.3g} ops/s vs {CORE_RATE:.3g} per core -> "
        f"verified {measured}, offered {offered}"
    )
    assert claimed == CLAIMED
    assert measured is not None and 1 <= measured < CLAIMED
    assert offered == measured
    assert measured == max(1, min(CLAIMED, int((passed.measured_rate or 0) // CORE_RATE)))
    client.deposit("100")
    with pytest.raises(LoomAPIError) as info:
        client.create_cluster({"resources": {"cpus": CLAIMED}, "duration": "10m"})
    assert info.value.code == "no_capacity"
    cluster = client.create_cluster({"resources": {"cpus": measured}, "duration": "10m"})
    assert cluster.members[0].units == measured
    with contextlib.suppress(LoomAPIError):  # it runs no Ray: the start fails anyway
        client.delete_cluster(cluster.id)
