"""The agent's Prometheus endpoint: `loom worker start --metrics-port N` (off by default;
0 picks a free port, logged at start).

A tiny HTTP server on the agent's event loop answers `GET /metrics` with what the agent
knows at that moment: connection, devices, cluster members and the health of their Ray
nodes. A registry of its own (never the process-global one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from loom.agent.main import Agent
from loom.agent.members import MemberManager

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192


@dataclass
class _Options:
    port: int | None = None
    host: str = "127.0.0.1"


_options = _Options()


def configure(port: int | None, host: str = "127.0.0.1") -> None:
    """Set from the command line before the agent runs; `serve` is a no-op without a port."""
    _options.port, _options.host = port, host


class AgentCollector(Collector):
    def __init__(self, agent: Agent, members: MemberManager) -> None:
        self.agent = agent
        self.members = members

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        agent, members = self.agent, self.members
        info = GaugeMetricFamily(
            "loom_agent_info", "This agent", labels=["node_id", "name", "region", "version"]
        )
        info.add_metric(
            [
                agent.node_id or "",
                agent.config.name,
                agent.config.region,
                agent.config.agent_version,
            ],
            1,
        )
        yield info
        yield GaugeMetricFamily(
            "loom_agent_connected",
            "1 while the WebSocket to the coordinator is up",
            value=1 if agent.connected.is_set() else 0,
        )
        rtts = agent.heartbeat_rtts
        yield GaugeMetricFamily(
            "loom_agent_heartbeat_rtt_seconds",
            "Round-trip time of the last acknowledged heartbeat",
            value=rtts[-1] if rtts else float("nan"),
        )
        devices = GaugeMetricFamily("loom_agent_devices", "Devices here", labels=["kind", "model"])
        util = GaugeMetricFamily(
            "loom_agent_gpu_utilization_percent", "GPU utilization", labels=["index"]
        )
        try:
            gpus = agent.probe.gpus()
            used = agent.probe.utilization()
        except Exception as exc:  # a probe failure must not break the scrape
            log.debug("metrics: GPU probe failed: %s", exc)
            gpus, used = [], []
        by_model: dict[str, int] = {}
        for gpu in gpus:
            by_model[gpu.model] = by_model.get(gpu.model, 0) + 1
        for model, n in sorted(by_model.items()):
            devices.add_metric(["gpu", model], n)
        devices.add_metric(["cpu", "cpu"], 1)
        yield devices
        for i, value in enumerate(used):
            util.add_metric([str(i)], value)
        yield util
        yield GaugeMetricFamily("loom_agent_cpu_cores", "CPU cores", value=os.cpu_count() or 0)
        ready = sum(1 for m in members.nodes if m in members.info)
        by_state = GaugeMetricFamily("loom_agent_members", "Cluster members here", labels=["state"])
        by_state.add_metric(["ready"], ready)
        by_state.add_metric(["starting"], len(members.nodes) - ready)
        yield by_state
        ray = GaugeMetricFamily(
            "loom_agent_ray_node_up",
            "1 while the member's Ray node runs and is registered with its head",
            labels=["cluster_id", "member_id", "role"],
        )
        for member_id, node in sorted(members.nodes.items()):
            up = node.state == "ready" and member_id in members.info
            ray.add_metric([node.spec.cluster_id, member_id, node.spec.role], 1 if up else 0)
        yield ray


class MetricsServer:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> MetricsServer:
        self.server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_BYTES)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = [*head.split(b"\r\n", 1)[0].split(), b"", b""]
            if method in (b"GET", b"HEAD") and path in (b"/metrics", b"/"):
                body = generate_latest(self.registry)
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            body_out = b"" if method == b"HEAD" else body
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body_out
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve(agent: Agent, members: MemberManager) -> MetricsServer | None:
    """Start the endpoint if a port was configured; it closes when the agent drains."""
    if _options.port is None:
        return None
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent, members))
    server = await MetricsServer(registry).start(_options.host, _options.port)
    agent.on_drain.append(server.close)
    log.info("metrics on http://%s:%d/metrics", _options.host, server.port)
    return server
