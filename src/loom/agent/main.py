"""The agent: dial out to the coordinator, prove who we are, report, obey, heartbeat.

One outbound WebSocket (works behind NAT). On a lost connection the agent reconnects
with capped exponential backoff and jitter; on SIGTERM it drains: stops its work, tells
the coordinator, and closes cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import websockets
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from loom.agent import diagnostics
from loom.agent.backoff import Backoff
from loom.agent.config import AgentConfig
from loom.agent.inventory import GpuProbe, LoadSampler, collect
from loom.protocol.commands import AgentCommand, BadCommand, parse_as
from loom.protocol.identity import KeyPair, agent_auth_message, binding_message
from loom.protocol.messages import (
    CLOSE_AUTH_FAILED,
    CLOSE_BAD_MESSAGE,
    CLOSE_BANNED,
    CLOSE_PROTOCOL_TOO_OLD,
    MAX_FRAME_BYTES,
    Ack,
    Auth,
    Command,
    Drain,
    ErrorMsg,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Inventory,
    Report,
    Welcome,
    coordinator_message_adapter,
)
from loom.protocol.version import PROTOCOL_VERSION

log = logging.getLogger(__name__)

C = TypeVar("C", bound=AgentCommand[Any])


@dataclass(frozen=True)
class Handler(Generic[C]):
    """Serves one typed command (see :mod:`loom.protocol.commands`): ``fn`` gets the model."""

    command: type[C]
    fn: Callable[[C], Awaitable[BaseModel]]

    def parse(self, args: dict[str, Any]) -> C:
        return parse_as(self.command, args)

    async def __call__(self, command: C) -> BaseModel:
        return await self.fn(command)


def handler(command: type[C], fn: Callable[[C], Awaitable[BaseModel]]) -> Handler[C]:
    return Handler(command, fn)


def handlers(*items: Handler[Any]) -> dict[str, Handler[Any]]:
    """Wire name → handler, for ``Agent.handlers.update``."""
    return {h.command.wire_name: h for h in items}


CommandObserver = Callable[[AgentCommand[Any], bool], None]
#: Close codes after which reconnecting cannot help.
FATAL_CLOSE_CODES = {CLOSE_AUTH_FAILED, CLOSE_PROTOCOL_TOO_OLD, CLOSE_BANNED, CLOSE_BAD_MESSAGE}


class AgentRefused(RuntimeError):
    """The coordinator refused this agent for a reason reconnecting will not fix."""


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        node_key: KeyPair,
        owner_key: KeyPair,
        probe: GpuProbe,
        runtimes: list[str] | None = None,
        protocol: int = PROTOCOL_VERSION,
    ) -> None:
        self.config = config
        self.node_key = node_key
        self.owner_key = owner_key
        self.probe = probe
        self.runtimes = runtimes or []
        self.protocol = protocol
        self.node_id: str | None = None
        self.handlers: dict[str, Handler[Any]] = {}
        self.on_drain: list[Callable[[], Awaitable[None]]] = []
        self._stop = asyncio.Event()
        self._drained = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._beat_sent: dict[int, float] = {}
        self._ws: ClientConnection | None = None
        self._outbox: list[str] = []
        self._sampler = LoadSampler(probe)
        self.connected = asyncio.Event()
        self.heartbeat_rtts: list[float] = []
        # Binary frames are the tunnel's (loom.agent.tunnel); it resets when a session ends.
        self.on_binary: Callable[[bytes], Awaitable[None]] | None = None
        self.on_disconnect: list[Callable[[], Awaitable[None]]] = []
        # Observers (loom.agent.supplier_log): each session's welcome, each command's outcome.
        self.on_connected: list[Callable[[str, str], None]] = []
        self.on_command: list[CommandObserver] = []

    # -- public -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the agent to drain and exit (what SIGTERM does)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        diagnostics.install(loop)  # SIGUSR1/SIGUSR2: stacks to the log, for a stuck agent

    async def report(self, kind: str, data: dict[str, Any]) -> None:
        """Send a fact up; buffered while disconnected and sent on reconnect."""
        text = Report(kind=kind, data=data).model_dump_json()
        ws = self._ws
        if ws is None:
            self._outbox.append(text)
            return
        try:
            await ws.send(text)
        except ConnectionClosed:
            self._outbox.append(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary (tunnel) frame; raises ConnectionError when not connected."""
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected to the coordinator")
        await ws.send(data)

    async def run(self) -> None:
        """Stay connected until stopped. With several coordinator replicas
        (``--coordinator URL1,URL2,…``) every failed or lost connection moves on to the
        next URL, after the capped, jittered backoff; Ray members keep running meanwhile
        and are resynchronised by the coordinator on the new connection (``member.sync``)."""
        backoff = Backoff()
        try:
            urls = self.config.ws_urls
        except ValueError as exc:
            raise AgentRefused(f"bad coordinator URL: {exc}") from None
        turn = 0
        while not self._stop.is_set():
            url = urls[turn % len(urls)]
            try:
                await self._session(backoff, url)
            except AgentRefused:
                raise
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
                log.warning("connection to %s lost: %s", url, _why(exc))
                turn += 1  # the next replica (the same one when there is only one)
            except InvalidURI as exc:
                raise AgentRefused(f"bad coordinator URL: {exc}") from None
            finally:
                self._ws = None
                self.connected.clear()
                for hook in self.on_disconnect:
                    with contextlib.suppress(Exception):
                        await hook()
            if self._stop.is_set():
                break
            delay = backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        await self._drain_local()

    # -- one connection -----------------------------------------------------------------

    async def _session(self, backoff: Backoff, url: str) -> None:
        # Taken before dialling (in a thread: it reads /proc, the disk, NVML): the
        # coordinator gives a handshake 10 s, which a loaded machine must not spend here.
        inventory = await asyncio.to_thread(
            collect, self.probe, self.config.work_dir, runtimes=self.runtimes
        )
        async with websockets.connect(
            url,
            max_size=MAX_FRAME_BYTES,
            open_timeout=10,
            ping_interval=20,
            compression=None,
        ) as ws:
            welcome = await self._handshake(ws, inventory)
            self.node_id = welcome.node_id
            self._ws = ws
            self.connected.set()
            backoff.reset()
            log.info(
                "connected as %s (%s), state %s", self.config.name, welcome.node_id, welcome.state
            )
            for observe in self.on_connected:
                observe(welcome.node_id, welcome.state)
            interval = self.config.heartbeat_interval_s or welcome.heartbeat_interval_s
            while self._outbox:
                await ws.send(self._outbox.pop(0))
            beats = asyncio.create_task(self._heartbeats(ws, interval))
            stop_wait = asyncio.create_task(self._stop.wait())
            receive = asyncio.create_task(self._receive(ws))
            try:
                done, _ = await asyncio.wait(
                    {beats, receive, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if stop_wait in done:
                    await self._drain_local()
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(Drain(reason="agent stopped (SIGTERM)").model_dump_json())
                        await asyncio.wait_for(ws.wait_closed(), 5)
                for task in done:
                    if task is not stop_wait:
                        task.result()  # re-raise what ended the connection
            finally:
                for task in (beats, receive, stop_wait):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _handshake(self, ws: ClientConnection, inventory: Inventory) -> Welcome:
        hello = Hello.model_validate_json(await asyncio.wait_for(ws.recv(), 10))
        auth = Auth(
            protocol=self.protocol,
            agent_version=self.config.agent_version,
            node_key=self.node_key.public_hex,
            owner_key=self.owner_key.public_hex,
            binding_sig=self.owner_key.sign(binding_message(self.node_key.public_hex)).hex(),
            nonce_sig=self.node_key.sign(agent_auth_message(hello.nonce)).hex(),
            name=self.config.name,
            region=self.config.region,
            country=self.config.country,
            price=self.config.price,
            inventory=inventory,
        )
        await ws.send(auth.model_dump_json())
        try:
            raw = await asyncio.wait_for(ws.recv(), 30)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            reason = exc.rcvd.reason if exc.rcvd else "connection dropped"
            if code in FATAL_CLOSE_CODES:
                raise AgentRefused(
                    f"coordinator refused this agent: {reason} (code {code})"
                ) from None
            raise
        return Welcome.model_validate_json(raw)

    async def _heartbeats(self, ws: ClientConnection, interval: float) -> None:
        seq = 0
        loop = asyncio.get_running_loop()
        self._beat_sent.clear()
        while True:
            seq += 1
            self._beat_sent[seq] = loop.time()
            await ws.send(Heartbeat(seq=seq, load=self._sampler.sample()).model_dump_json())
            await asyncio.sleep(interval)

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            if isinstance(raw, bytes):
                if self.on_binary is not None:
                    await self.on_binary(raw)
                continue
            try:
                msg = coordinator_message_adapter.validate_python(json.loads(raw))
            except ValueError as exc:
                log.warning("ignoring a message from the coordinator I cannot read: %s", exc)
                continue
            if isinstance(msg, HeartbeatAck):
                sent = self._beat_sent.pop(msg.seq, None)
                if sent is not None:
                    self.heartbeat_rtts.append(asyncio.get_running_loop().time() - sent)
                    del self.heartbeat_rtts[:-100]
            elif isinstance(msg, Command):
                task = asyncio.create_task(self._run_command(ws, msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(msg, ErrorMsg):
                log.warning("coordinator says %s: %s", msg.code, msg.message)
        # iteration ends on a clean close; look at why
        if ws.close_code in FATAL_CLOSE_CODES:
            raise AgentRefused(f"coordinator closed the connection: {ws.close_reason}")

    async def _run_command(self, ws: ClientConnection, cmd: Command) -> None:
        serve = self.handlers.get(cmd.name)
        command: AgentCommand[Any] | None = None
        if serve is None:
            ack = Ack(id=cmd.id, ok=False, error=f"unknown command {cmd.name!r}")
        else:
            try:
                command = parsed = serve.parse(cmd.args)
                reply = await serve(parsed)
                ack = Ack(id=cmd.id, ok=True, result=reply.model_dump(mode="json"))
            except BadCommand as exc:
                log.warning("refusing a malformed command: %s", exc)
                ack = Ack(id=cmd.id, ok=False, error=f"BadCommand: {exc}"[:500])
            except Exception as exc:
                log.exception("command %s failed", cmd.name)
                ack = Ack(id=cmd.id, ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        if command is not None:
            for seen in self.on_command:
                with contextlib.suppress(Exception):  # an observer never breaks a command
                    seen(command, ack.ok)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(ack.model_dump_json())

    async def _drain_local(self) -> None:
        if self._drained:
            return
        self._drained = True
        for hook in self.on_drain:
            try:
                await hook()
            except Exception:
                log.exception("drain hook failed")


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        rcvd = exc.rcvd
        return f"closed ({rcvd.code} {rcvd.reason})" if rcvd else "closed"
    return f"{type(exc).__name__}: {exc}"
