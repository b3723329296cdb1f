"""Typed agent commands: round trips, lenient parsing, clear errors, both sides end to end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from loom.agent.config import AgentConfig
from loom.agent.inventory import NoGpus
from loom.agent.main import Agent, handler, handlers
from loom.coordinator.agent_client import AgentClient
from loom.coordinator.hub import AgentHub, AgentNotConnected, CommandFailed
from loom.core.challenge import ChallengeSpec, NonceRelease, OpeningRequest, params_for
from loom.protocol.commands import (
    COMMANDS,
    AgentCommand,
    BadCommand,
    ChallengeAbort,
    ChallengeNonce,
    ChallengeOpen,
    ChallengeStart,
    MemberOverlayBlocklist,
    MemberPeerLost,
    MemberSeen,
    MemberStart,
    MemberStarted,
    MemberStop,
    MemberSync,
    MemberSynced,
    parse_command,
    parse_reply,
)
from loom.protocol.identity import KeyPair
from loom.protocol.messages import Ack, Command, agent_message_adapter

ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=40)
small_text = st.text(max_size=30)
cid = st.binary(min_size=16, max_size=16)


def _spec(seed: bytes) -> ChallengeSpec:
    return ChallengeSpec.create("n-1:cpu", params_for("test"), seed)


member_start = st.builds(
    MemberStart,
    cluster_id=ids,
    member_id=ids,
    role=st.sampled_from(["head", "worker"]),
    token=small_text,
    head_address=st.none() | st.just("10.0.0.1:6379"),
    num_cpus=st.integers(1, 512),
    gpu_indices=st.lists(st.integers(0, 15), max_size=8),
    env=st.dictionaries(st.text(min_size=1, max_size=10), small_text, max_size=4),
)
nonce = st.builds(ChallengeNonce, challenge_id=cid, round=st.integers(0, 2**32 - 1), nonce=cid)
commands: st.SearchStrategy[AgentCommand[Any]] = st.one_of(
    member_start,
    st.builds(MemberStop, member_id=ids),
    st.builds(MemberSync, members=st.lists(ids, max_size=5)),
    st.builds(MemberSeen, member_id=ids),
    st.builds(
        MemberPeerLost,
        member_id=ids,
        ray_node_id=st.text("0123456789abcdef", min_size=56, max_size=56),
        reason=small_text,
    ),
    st.builds(
        lambda seed, k: ChallengeStart(
            spec=_spec(seed),
            nonces=[NonceRelease(challenge_id=_spec(seed).challenge_id, round=0, nonce=seed)][:k],
        ),
        st.binary(min_size=16, max_size=16),
        st.integers(0, 1),
    ),
    nonce,
    st.builds(
        ChallengeOpen,
        challenge_id=cid,
        openings=st.lists(
            st.builds(
                OpeningRequest,
                round=st.integers(0, 9),
                tile_row=st.integers(0, 9),
                tile_col=st.integers(0, 9),
            ),
            max_size=3,
        ),
    ),
    st.builds(ChallengeAbort, challenge_id=cid),
    st.builds(
        MemberOverlayBlocklist,
        cluster_id=ids,
        fingerprints=st.lists(st.text("0123456789abcdef", min_size=64, max_size=64), max_size=4),
    ),
)


@settings(max_examples=150, deadline=None)
@given(commands)
def test_every_command_round_trips_through_the_wire_frame(command: AgentCommand[Any]) -> None:
    frame = Command(id="c1", name=command.wire_name, args=json.loads(command.args_json()))
    received = Command.model_validate_json(frame.model_dump_json())
    again = parse_command(received.name, received.args)
    assert type(again) is type(command) and again == command


def test_every_registered_command_has_a_reply_model_and_a_unique_name() -> None:
    assert len(COMMANDS) >= 8
    for name, model in COMMANDS.items():
        assert model.wire_name == name
        assert issubclass(model.reply_model, BaseModel)


def test_an_older_peer_ignores_fields_it_does_not_know() -> None:
    args = {"member_id": "m-1", "added_in_v9": {"x": 1}}
    assert parse_command("member.stop", args) == MemberStop(member_id="m-1")
    reply = parse_reply(MemberSync(members=[]), {"stopped": ["a"], "new_field": True})
    assert reply == MemberSynced(stopped=["a"])


def test_a_missing_or_wrong_field_is_a_clear_error() -> None:
    with pytest.raises(BadCommand, match=r"member\.start args\.token: Field required"):
        parse_command("member.start", {"cluster_id": "c", "member_id": "m", "role": "head"})
    with pytest.raises(BadCommand, match=r"member\.start args\.role"):
        parse_command(
            "member.start", {"cluster_id": "c", "member_id": "m", "role": "boss", "token": ""}
        )
    bad_overlay = {"cluster_id": "c", "member_id": "m", "role": "head", "token": "t"}
    with pytest.raises(BadCommand, match=r"args\.overlay\.ca_crt"):
        parse_command("member.start", {**bad_overlay, "overlay": {"overlay_ip": "10.0.0.1"}})
    with pytest.raises(BadCommand, match=r"unknown command 'member\.fly'"):
        parse_command("member.fly", {})
    with pytest.raises(BadCommand, match=r"member\.seen reply\.alive"):
        parse_reply(MemberSeen(member_id="m"), {"alive": "not a list"})


# -- both sides, end to end: AgentClient → hub → Agent → typed handler → ack → typed reply --


class _Loopback:
    """The agent's WebSocket as the hub sees it: frames go to a real Agent; acks come back."""

    def __init__(self, agent: Agent, hub: AgentHub) -> None:
        self.agent, self.hub = agent, hub
        self.tasks: set[asyncio.Task[None]] = set()

    async def send_text(self, data: str) -> None:
        cmd = Command.model_validate_json(data)
        task = asyncio.create_task(self.agent._run_command(self, cmd))  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send(self, text: str) -> None:  # the agent answering
        ack = agent_message_adapter.validate_json(text)
        assert isinstance(ack, Ack)
        self.hub.connections["n-1"].resolve(ack)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        return None


def _agent(tmp_path: Path) -> Agent:
    config = AgentConfig(
        coordinator="ws://127.0.0.1:1",
        name="t",
        region="eu-west",
        country="",
        price="0.1",
        work_dir=tmp_path,
    )
    return Agent(config, node_key=KeyPair.generate(), owner_key=KeyPair.generate(), probe=NoGpus())


async def test_agent_client_and_agent_speak_typed_commands(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    got: list[AgentCommand[Any]] = []

    async def start(cmd: MemberStart) -> MemberStarted:
        got.append(cmd)
        return MemberStarted(ray_node_id="r" * 8, gcs_address=f"{cmd.member_id}:6379")

    async def sync(cmd: MemberSync) -> MemberSynced:
        got.append(cmd)
        return MemberSynced(running=cmd.members)

    agent.handlers.update(handlers(handler(MemberStart, start), handler(MemberSync, sync)))
    seen: list[tuple[str, bool]] = []
    agent.on_command.append(lambda c, ok: seen.append((c.wire_name, ok)))
    hub = AgentHub()
    client = AgentClient(hub)
    await hub.attach("n-1", _Loopback(agent, hub), 0.0)

    command = MemberStart(cluster_id="c-1", member_id="m-1", role="head", token="t")
    started = await client.member_start("n-1", command, timeout=10)
    assert started == MemberStarted(ray_node_id="r" * 8, gcs_address="m-1:6379")
    assert got == [command]
    assert (await client.member_sync("n-1", ["m-1"])).running == ["m-1"]
    # A command the agent has no handler for: a negative ack, not a hang or a crash.
    with pytest.raises(CommandFailed, match=r"unknown command 'member\.seen'"):
        await client.member_seen("n-1", "m-1", timeout=10)
    assert seen == [("member.start", True), ("member.sync", True)]
    with pytest.raises(AgentNotConnected):
        await client.member_stop("n-2", "m-1")


async def test_a_malformed_command_gets_a_negative_ack_naming_the_field(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    ran: list[MemberStop] = []

    async def stop(cmd: MemberStop) -> BaseModel:
        ran.append(cmd)
        raise AssertionError("must not run")

    agent.handlers.update(handlers(handler(MemberStop, stop)))
    hub = AgentHub()
    await hub.attach("n-1", _Loopback(agent, hub), 0.0)
    ack = await hub.get("n-1").request("member.stop", '{"member":"m-1"}', timeout=10)
    assert not ack.ok and "member.stop args.member_id: Field required" in ack.error
    ack = await hub.get("n-1").request("member.stop", '{"member_id":""}', timeout=10)
    assert not ack.ok and "member_id" in ack.error
    assert ran == []
