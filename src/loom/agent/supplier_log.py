"""What a supplier sees of its machine: one log line per event it cares about, and a local
status file for `loom worker status`.

Events: verified (the measured rate, what was required, the price it now sells at),
allocated to a cluster (role, price), released, earnings settled (and today's total),
drained on SIGTERM (the clusters it left). Allocation and release come from the agent's
own commands; verification and settlement from the coordinator's public explorer view of
this node (`/explorer/api/nodes/{id}`), polled every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx

from loom.protocol.commands import AgentCommand, MemberStart, MemberStop

log = logging.getLogger("loom.supplier")

STATUS_FILE = "status.json"
POLL_S = 5.0


def _dec(text: object) -> Decimal:
    try:
        return Decimal(str(text))
    except (InvalidOperation, ValueError):
        return Decimal(0)


def _rate(x: object) -> str:
    if not isinstance(x, int | float):
        return "?"
    for value, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= value:
            return f"{x / value:.2f} {unit}OPS"
    return f"{x:.2f} OPS"


class SupplierLog:
    def __init__(self, coordinator: str, name: str, work_dir: Path) -> None:
        self.base = coordinator.rstrip("/")
        self.name = name
        self.path = work_dir / STATUS_FILE
        self.node_id = ""
        self.state = "starting"
        self.clusters: dict[str, str] = {}  # cluster id -> role
        self.members: dict[str, str] = {}  # member id -> cluster id
        self.verified: dict[str, str] = {}  # device id -> what was logged
        self.price = ""
        self.settled = Decimal(-1)  # unknown until the first poll
        self.day = time.strftime("%Y-%m-%d")
        self.settled_today = Decimal(0)
        self._task: asyncio.Task[None] | None = None

    # -- events from the agent itself ---------------------------------------------------

    def connected(self, node_id: str, state: str) -> None:
        self.node_id = node_id
        self.state = state
        self.write()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def command(self, command: AgentCommand[Any], ok: bool) -> None:
        if not ok:
            return
        if isinstance(command, MemberStart):
            cluster, member, role = command.cluster_id, command.member_id, command.role
            self.clusters[cluster] = role
            self.members[member] = cluster
            price = f" at {self.price} credits/device-hour" if self.price else ""
            log.info(
                "allocated: cluster %s as %s (%s cpu)%s",
                cluster,
                role,
                command.num_cpus,
                price,
            )
        elif isinstance(command, MemberStop):
            member = command.member_id
            cluster = self.members.pop(member, "")
            if cluster and cluster not in self.members.values():
                self.clusters.pop(cluster, None)
            log.info("released: cluster %s (member %s stopped)", cluster or "?", member)
        else:
            return
        self.write()

    def drained(self) -> None:
        left = ", ".join(sorted(self.clusters)) or "no clusters"
        log.info("drained on SIGTERM: left %s; the coordinator moves them elsewhere", left)
        self.state = "drained"
        self.clusters.clear()
        self.members.clear()
        self.write()
        if self._task is not None:
            self._task.cancel()

    # -- the coordinator's view of this node ---------------------------------------------

    async def _watch(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=10.0) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                    response = await http.get(f"/explorer/api/nodes/{self.node_id}")
                    if response.status_code == 200:
                        self.observe(response.json())
                await asyncio.sleep(POLL_S)

    def observe(self, node: dict[str, Any]) -> None:
        """Fold in one explorer view of this node; log what changed."""
        if self.state != "drained":
            self.state = str(node.get("state", self.state))
        self.price = str(node.get("price", self.price))
        challenges: dict[str, dict[str, Any]] = {
            str(c.get("device_id")): c
            for c in reversed(node.get("challenges") or [])
            if c.get("outcome") == "passed"
        }
        for device in node.get("device_list") or []:
            device_id = str(device.get("id") or device.get("device_id") or device.get("model"))
            if device.get("state") != "verified" or device_id in self.verified:
                continue
            c: dict[str, Any] = next(
                (c for k, c in challenges.items() if k.endswith(device_id)),
                next(iter(challenges.values()), {}),
            )
            cores = device.get("cores_verified")
            what = (
                f"{device.get('model')}{f' ({cores} cores)' if cores else ''}: measured "
                f"{_rate(c.get('measured_rate'))} (required {_rate(c.get('required_rate'))})"
            )
            self.verified[device_id] = what
            log.info("verified: %s; sellable at %s credits/device-hour", what, self.price or "?")
        earnings = node.get("earnings") or {}
        settled = _dec(earnings.get("settled"))
        today = time.strftime("%Y-%m-%d")
        if today != self.day:
            self.day, self.settled_today = today, Decimal(0)
        if self.settled >= 0 and settled > self.settled:
            gained = settled - self.settled
            self.settled_today += gained
            log.info(
                "earnings settled: +%s credits (gross; %s net of fees in total, %s today)",
                gained,
                earnings.get("paid", "?"),
                self.settled_today,
            )
        self.settled = max(self.settled, settled)
        self.write()

    # -- the status file ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node_id": self.node_id,
            "coordinator": self.base,
            "pid": os.getpid(),
            "state": self.state,
            "verified": sorted(self.verified.values()),
            "clusters": [{"id": c, "role": r} for c, r in sorted(self.clusters.items())],
            "price": self.price,
            "earnings_settled": str(max(self.settled, Decimal(0))),
            "earnings_today": str(self.settled_today),
            "day": self.day,
            "updated_at": time.time(),
        }

    def write(self) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot(), indent=2))
            tmp.chmod(0o600)  # the supplier's own facts (clusters served, earnings)
            tmp.replace(self.path)


def read_status(work_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((work_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Hook = Callable[[str, dict[str, Any], bool], None]
