"""One NATS connection per replica, shared by the bus, the command router and the relay.

nats-py reconnects on its own (forever here, with its own jittered wait); subscriptions
survive a reconnect. What was published while the link was down may be lost: the users
of the link register ``on_reconnect`` hooks to repair (the placement index resyncs).

Credentials: in the URL (``nats://USER:PASS@HOST:PORT``, ``nats://TOKEN@HOST:PORT``) or in
a file (``--bus-creds FILE``, or ``$LOOM_BUS_CREDS``): one line ``USER:PASS`` or ``TOKEN``,
or a NATS ``.creds`` file (JWT and NKey seed; needs the ``nkeys`` package). No secret is
ever logged or put in an error: URLs are shown with ``***`` for the password or token
(:func:`redact`), and every message the NATS client produces is scrubbed of them.

Start-up first *probes* the bus (one attempt per server, no reconnecting), so a wrong
credential or an unreachable server is one clear error at once; the connection itself
then reconnects forever.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3
#: Where ``--bus-creds`` is found when not passed explicitly (the CLI sets it).
CREDS_ENV = "LOOM_BUS_CREDS"
_AUTH_VIOLATION = "authorization violation"


class BusUnavailable(RuntimeError):
    """The NATS server named by ``--bus`` cannot be reached at start-up."""


class BusAuthFailed(BusUnavailable):
    """The NATS server refused this replica's credentials (or wants some)."""


class BusConfigError(ValueError):
    """A ``--bus``/``--bus-creds`` value that cannot be used (said without its secret)."""


def split_urls(url: str) -> list[str]:
    return [u.strip() for u in url.split(",") if u.strip()]


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme, userinfo, rest) of a URL with credentials in it, else None."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return None
    # NATS URLs have no path: all before the last @ is userinfo (a stray / or @ in a
    # password stays hidden too).
    userinfo, _, host = rest.rpartition("@")
    return scheme, userinfo, host


def redact(url: str) -> str:
    """``url`` (one or several, comma-separated) with each password or token as ``***``."""
    out = []
    for one in split_urls(url):
        parts = _userinfo(one)
        if parts is not None:
            scheme, userinfo, rest = parts
            user, colon, _ = userinfo.partition(":")
            one = f"{scheme}://{user}:***@{rest}" if colon else f"{scheme}://***@{rest}"
        out.append(one)
    return ",".join(out)


def url_secrets(url: str) -> set[str]:
    """The passwords and tokens written in ``url`` (raw and percent-decoded)."""
    found: set[str] = set()
    for one in split_urls(url):
        parts = _userinfo(one)
        if parts is None:
            continue
        user, colon, password = parts[1].partition(":")
        secret = password if colon else user
        if secret:
            found |= {secret, unquote(secret)}
    return found


def read_creds(path: str) -> dict[str, Any]:
    """The connect options a credentials file gives (see the module's docstring)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
        mode = file.stat().st_mode
    except OSError as exc:
        raise BusConfigError(
            f"cannot read the bus credentials file {file}: {exc.strerror}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the bus credentials file %s is readable by others: chmod 600 it", file)
    if "BEGIN NATS USER JWT" in text:
        if importlib.util.find_spec("nkeys") is None:
            raise BusConfigError(
                f"{file} is a NATS .creds file: signing with it needs the nkeys package "
                "(pip install nkeys)"
            )
        return {"user_credentials": str(file)}
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        raise BusConfigError(f"the bus credentials file {file} is empty (USER:PASS or TOKEN)")
    user, colon, password = line.partition(":")
    if colon:
        if not user or not password:
            raise BusConfigError(f"the bus credentials file {file} must hold USER:PASS or TOKEN")
        return {"user": user, "password": password}
    return {"token": line}


class NatsLink:
    def __init__(self, url: str, replica_id: str, creds: str | None = None) -> None:
        self.url = url
        self.replica_id = replica_id
        #: The credentials file (None: ``$LOOM_BUS_CREDS``, if set).
        self.creds = os.environ.get(CREDS_ENV, "") if creds is None else creds
        self._options: dict[str, Any] | None = None
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

    async def registered(self) -> None:
        """A round trip to the server, after subscribing: the subscriptions made so far are
        registered there, so nothing another replica publishes from now on is missed.
        (A link that is down resubscribes when it reconnects.)"""
        try:
            await self.nc.flush(timeout=5)
        except Exception as exc:  # best effort: the link reports its own state
            log.debug("flush after subscribing failed: %s", exc)

    @property
    def shown(self) -> str:
        """The URL as it may be logged: no password, no token."""
        return redact(self.url)

    def _auth(self) -> dict[str, Any]:
        """The connect options the credentials file gives (read once)."""
        if self._options is None:
            options = read_creds(self.creds) if self.creds else {}
            if options and url_secrets(self.url):
                raise BusConfigError(
                    "bus credentials given twice: in the --bus URL and --bus-creds"
                )
            self._options = options
        return self._options

    def _secrets(self) -> set[str]:
        found = url_secrets(self.url)
        if self._options:
            found |= {str(self._options[k]) for k in ("password", "token") if k in self._options}
        return found

    def scrub(self, text: str) -> str:
        """``text`` without any of this link's secrets in it."""
        for secret in sorted(self._secrets(), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def _refusal(self, exc: BaseException, errors: list[str]) -> BusUnavailable:
        said = self.scrub(f"{type(exc).__name__}: {exc}")
        heard = " ".join([said, *errors]).lower()
        if isinstance(exc, nats.errors.AuthorizationError) or _AUTH_VIOLATION in heard:
            if self._secrets() or self.creds:
                return BusAuthFailed(
                    f"the NATS server at {self.shown} refused our credentials "
                    "(Authorization Violation): fix the user/password or token in --bus or "
                    "--bus-creds"
                )
            return BusAuthFailed(
                f"the NATS server at {self.shown} requires credentials: pass "
                "--bus nats://USER:PASS@HOST:PORT, nats://TOKEN@HOST:PORT or --bus-creds FILE"
            )
        return BusUnavailable(
            f"cannot reach the NATS server at {self.shown} ({said}); start nats-server or fix --bus"
        )

    async def probe(self) -> None:
        """Connect once (one attempt per server, no reconnecting) and leave: raises
        BusAuthFailed / BusUnavailable / BusConfigError with a message fit to print."""
        errors: list[str] = []

        async def heard(exc: Exception) -> None:
            errors.append(self.scrub(str(exc)))

        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=split_urls(self.url),
                    name=f"loom-coordinator-{self.replica_id}-probe",
                    connect_timeout=CONNECT_TIMEOUT_S,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # 0 would mean "forever" to nats-py
                    reconnect_time_wait=0.2,
                    error_cb=heard,
                    **self._auth(),
                ),
                (CONNECT_TIMEOUT_S + 1) * 2 * max(1, len(split_urls(self.url))),
            )
        except BusConfigError:
            raise
        except Exception as exc:  # nats raises several kinds; told apart by _refusal
            raise self._refusal(exc, errors) from None
        await nc.close()

    async def start(self) -> None:
        await self.probe()
        try:
            self._nc = await asyncio.wait_for(
                nats.connect(
                    servers=split_urls(self.url),
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
                    **self._auth(),
                ),
                # The probe just succeeded; a connect that still hangs (the server went
                # away meanwhile) is an unavailable bus, not a wait forever.
                (CONNECT_TIMEOUT_S + 1) * 4,
            )
        except Exception as exc:
            raise self._refusal(exc, []) from None
        self.connected = True
        log.info("replica %s joined the bus at %s", self.replica_id, self.shown)

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
        log.warning("bus: %s: %s", type(exc).__name__, self.scrub(str(exc)))
