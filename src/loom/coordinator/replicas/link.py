"""One NATS connection per replica, shared by the bus, the command router and the relay.

nats-py reconnects on its own (forever here, with its own jittered wait); subscriptions
survive a reconnect. What was published while the link was down may be lost: the users
of the link register ``on_reconnect`` hooks to repair (the placement index resyncs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3


class BusUnavailable(RuntimeError):
    """The NATS server named by ``--bus`` cannot be reached at start-up."""


class NatsLink:
    def __init__(self, url: str, replica_id: str) -> None:
        self.url = url
        self.replica_id = replica_id
        self._nc: NATS | None = None
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self.reconnects = 0
        self.connected = False
        self._closing = False

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise BusUnavailable("the NATS link is not started")
        return self._nc

    async def start(self) -> None:
        servers = [u.strip() for u in self.url.split(",") if u.strip()]
        try:
            self._nc = await nats.connect(
                servers=servers,
                name=f"loom-coordinator-{self.replica_id}",
                connect_timeout=CONNECT_TIMEOUT_S,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                # A replica never needs its own messages back: its events are applied
                # locally as they are published, its commands go to its own hub.
                no_echo=True,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                error_cb=self._error,
            )
        except Exception as exc:  # nats raises several kinds; all mean the same here
            raise BusUnavailable(
                f"cannot reach the NATS server at {self.url} ({type(exc).__name__}: {exc}); "
                "start nats-server or fix --bus"
            ) from None
        self.connected = True
        log.info("replica %s joined the bus at %s", self.replica_id, self.url)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self.connected = False
        self._closing = True
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5)
            except Exception:
                await nc.close()

    async def _disconnected(self) -> None:
        self.connected = False
        if self._closing:
            return
        log.warning("replica %s lost the bus; reconnecting", self.replica_id)

    async def _reconnected(self) -> None:
        self.connected = True
        self.reconnects += 1
        log.info("replica %s is back on the bus", self.replica_id)
        for hook in self.on_reconnect:
            try:
                await hook()
            except Exception:
                log.exception("bus reconnect hook failed")

    async def _error(self, exc: Exception) -> None:
        log.warning("bus: %s: %s", type(exc).__name__, exc)
