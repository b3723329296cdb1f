"""An agent given several coordinator URLs fails over between them (issue 11 §4).

The first URL is a dead port, as a replica that just died would be: the agent moves to the
next one and connects; when that connection is lost it comes back (here to the same live
coordinator, the only one), reconnecting within a second or two.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from loom.agent.config import AgentConfig, agent_ws_urls
from loom.agent.inventory import NoGpus
from loom.agent.main import Agent
from loom.protocol.identity import KeyPair
from support.servers import CoordinatorThread, free_port


def test_urls_are_parsed_in_order_and_checked() -> None:
    assert agent_ws_urls("http://a:1, https://b:2") == [
        "ws://a:1/v1/agent/ws",
        "wss://b:2/v1/agent/ws",
    ]
    for bad in ("", " , ", "ftp://x:1"):
        try:
            agent_ws_urls(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


async def test_agent_skips_a_dead_replica_and_reconnects(
    coordinator: CoordinatorThread, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = AgentConfig(
        coordinator=f"{dead},{coordinator.url}", name="fo", region="eu-west", country="",
        price="0.3", work_dir=tmp_path / "fo",
    )  # fmt: skip
    agent = Agent(config, node_key=KeyPair.generate(), owner_key=KeyPair.generate(), probe=NoGpus())
    lost = asyncio.Event()
    lost_at: list[float] = []

    async def on_lost() -> None:
        lost_at.append(time.monotonic())
        lost.set()

    agent.on_disconnect.append(on_lost)
    run = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 20)
        node_id = agent.node_id
        assert node_id is not None

        async def drop() -> None:
            conn = coordinator.state.hub.connections[node_id]
            await conn.ws.close(code=1012, reason="replica restarting")

        await asyncio.get_running_loop().run_in_executor(None, coordinator.run_coro, drop())
        await asyncio.wait_for(lost.wait(), 20)
        t0 = lost_at[0]
        await asyncio.wait_for(agent.connected.wait(), 20)  # via the dead URL, then back
        print(f"\nreconnected in {time.monotonic() - t0:.2f} s")
        assert time.monotonic() - t0 < 10
    finally:
        agent.stop()
        await asyncio.wait_for(run, 20)
