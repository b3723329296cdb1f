"""The change-event bus over NATS: every replica's placement index hears every change.

Same interface as the in-process :class:`~loom.coordinator.bus.EventBus` (it is one):
``publish`` delivers to this replica's subscribers at once and queues the event's JSON for
``loom.events.<type>``; events from other replicas are parsed and delivered to the same
subscribers. Events name what changed, never the values (``loom.protocol.events``), so a
late or duplicated event costs a re-read, and a lost one (the link was down) is repaired by
the index's resync, which the link's reconnect hook runs at once.

Besides events, the bus carries *signals*: a name and nothing else, on
``loom.events.<name>`` (``clusters.wake``: "a cluster has work; reconcilers, look now").
A lost signal costs the listener's next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from loom.coordinator.bus import Event, EventBus
from loom.coordinator.replicas.link import NatsLink
from loom.protocol.events import parse_event

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "loom.events."
#: Events waiting for the link; beyond this the oldest are dropped (resync repairs).
MAX_QUEUED = 100_000
#: The signal that wakes every replica's cluster reconciler (``loops.clusters.wire_wake``).
CLUSTERS_WAKE = "clusters.wake"
#: Signals known to every replica (one nobody listens to here is dropped, not misread).
SIGNALS = frozenset({CLUSTERS_WAKE})


def subject_for(event: Event) -> str:
    return SUBJECT_PREFIX + event.type


class NatsBus(EventBus):
    def __init__(self, link: NatsLink) -> None:
        super().__init__()
        self.link = link
        self.received = 0
        self.dropped = 0
        #: Called with each event from another replica, before the subscribers.
        self.on_remote: list[Callable[[Event], None]] = []
        self._queue: asyncio.Queue[tuple[str, bytes]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        self._signals: dict[str, list[Callable[[], None]]] = {}
        self.signals_received = 0

    async def start(self) -> None:
        """Subscribe to the other replicas' events and start sending ours (after
        ``link.start``)."""
        self._queue = asyncio.Queue(MAX_QUEUED)
        self._sub = await self.link.nc.subscribe(SUBJECT_PREFIX + ">", cb=self._on_message)
        await self.link.registered()  # no event published after start() is missed
        self._sender = asyncio.create_task(self._send_loop(), name="bus-sender")

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
            self._sender = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def publish(self, event: Event) -> None:
        super().publish(event)  # this replica first: its index must see its own change
        queue = self._queue
        if queue is None:
            return
        item = (subject_for(event), event.model_dump_json().encode())
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1

    def signal(self, name: str) -> None:
        """Tell the other replicas' listeners of ``name`` (not this replica's: its own
        code raised it and acts on it directly)."""
        if self._queue is None:
            return
        try:
            self._queue.put_nowait((SUBJECT_PREFIX + name, b""))
        except asyncio.QueueFull:
            self.dropped += 1

    def on_signal(self, name: str, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` whenever another replica signals ``name``; returns the remover."""
        listeners = self._signals.setdefault(name, [])
        listeners.append(fn)
        return lambda: listeners.remove(fn)

    async def _send_loop(self) -> None:
        assert self._queue is not None
        while True:
            subject, payload = await self._queue.get()
            try:
                await self.link.nc.publish(subject, payload)
            except Exception as exc:  # link down: the other replicas' resync repairs it
                self.dropped += 1
                log.debug("event not sent (%s): %s", subject, exc)

    async def _on_message(self, msg: Msg) -> None:
        name = msg.subject.removeprefix(SUBJECT_PREFIX)
        if name in SIGNALS or name in self._signals:
            self.signals_received += 1
            for listener in list(self._signals.get(name, ())):
                try:
                    listener()
                except Exception:
                    log.exception("signal listener failed on %s", msg.subject)
            return
        try:
            event = parse_event(msg.data)
        except ValidationError:
            log.warning("ignoring an unreadable event on %s", msg.subject)
            return
        self.received += 1
        for fn in self.on_remote:
            try:
                fn(event)
            except Exception:
                log.exception("remote event hook failed on %s", event.type)
        self.deliver(event)
