"""The coordinator's in-process event bus: ``publish(event)`` to subscribers.

Subscribers are plain synchronous callables and must be cheap (the placement index only
marks a node dirty). Code that holds a database session publishes with
:func:`publish_on`, which finds the bus the session factory was configured with
(``sessions.configure(info={BUS_KEY: bus})`` at start-up), so service functions need no
extra parameter and sessions without a bus (tools, tests of one service) publish nothing.

Events are typed pydantic models (``loom.protocol.events``) that serialise to JSON; with
coordinator replicas the same interface is carried over NATS
(:class:`loom.coordinator.replicas.bus.NatsBus`, chosen by ``Settings.bus_url``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from loom.protocol.events import ChangeCause, NodeChanged, NodePresence

log = logging.getLogger(__name__)

BUS_KEY = "loom.bus"
PENDING_KEY = "loom.bus.pending"
Event = NodeChanged | NodePresence
Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self.published = 0

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def publish(self, event: Event) -> None:
        """A change made by this process: to every subscriber (and, on a replicated
        bus, to the other replicas)."""
        self.published += 1
        self.deliver(event)

    def deliver(self, event: Event) -> None:
        """Hand ``event`` to this process's subscribers."""
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:  # one broken subscriber must not break the publisher
                log.exception("event subscriber failed on %s", event.type)


def bus_of(session: AsyncSession) -> EventBus | None:
    bus = session.info.get(BUS_KEY)
    return bus if isinstance(bus, EventBus) else None


def publish_on(session: AsyncSession, node_id: str, cause: ChangeCause) -> None:
    """Publish ``NodeChanged(node_id, cause)`` on the session's bus once the session's
    transaction commits (dropped if it rolls back: nothing changed); no bus, no event.

    After the commit, a subscriber's re-read is sure to see the change."""
    bus = bus_of(session)
    if bus is None or not node_id:
        return
    pending = session.info.setdefault(PENDING_KEY, [])
    pending.append(NodeChanged(node_id=node_id, cause=cause))


@event.listens_for(Session, "after_commit")
def _publish_pending(session: Session) -> None:
    pending = session.info.pop(PENDING_KEY, None)
    bus = session.info.get(BUS_KEY)
    if pending and isinstance(bus, EventBus):
        for item in dict.fromkeys(pending):  # once per (node, cause), in order
            bus.publish(item)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(PENDING_KEY, None)
