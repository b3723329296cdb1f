"""Disjoint blocks of host ports, one per member's Ray node.

Every Ray node listens on a dozen fixed ports plus one port per worker process, on all
interfaces of the host network; several nodes share one machine (the demo runs three
agents on one laptop), so each member gets its own block, checked free by binding.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass


class PortsExhausted(RuntimeError):
    """No free block of ports is left in the allocator's range."""


#: Offsets inside a port block; offset 0 is the sentinel held by the agent.
_FIXED = {
    "gcs": 1,
    "dashboard": 2,
    "client_server": 3,
    "node_manager": 4,
    "object_manager": 5,
    "dashboard_agent_grpc": 6,
    "dashboard_agent_listen": 7,
    "runtime_env_agent": 8,
    "metrics_export": 9,
}
_FIRST_WORKER_OFFSET = 16


@dataclass(frozen=True)
class PortBlock:
    """The host ports one member's Ray node uses (all distinct)."""

    gcs: int
    dashboard: int
    client_server: int
    node_manager: int
    object_manager: int
    dashboard_agent_grpc: int
    dashboard_agent_listen: int
    runtime_env_agent: int
    metrics_export: int
    min_worker: int
    max_worker: int

    @classmethod
    def at(cls, start: int, size: int = 128) -> PortBlock:
        if size <= _FIRST_WORKER_OFFSET + 8:
            raise ValueError(f"port block size {size} is too small")
        fixed = {name: start + off for name, off in _FIXED.items()}
        return cls(**fixed, min_worker=start + _FIRST_WORKER_OFFSET, max_worker=start + size - 1)

    def ports(self) -> list[int]:
        fixed = [getattr(self, name) for name in _FIXED]
        return fixed + list(range(self.min_worker, self.max_worker + 1))


def port_is_free(port: int) -> bool:
    """True if a server could bind ``port`` on all interfaces right now (IPv4 and IPv6)."""
    families: list[tuple[socket.AddressFamily, str]] = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


class PortLease:
    """A block of ports held for one member until :meth:`release`.

    The block's first port is bound (not listening, no SO_REUSEADDR) for as long as the
    lease lives: another agent on the same machine probing that block fails to bind it
    and moves on, and the kernel frees it if this agent dies.
    """

    def __init__(
        self, allocator: PortAllocator, start: int, block: PortBlock, sentinel: socket.socket
    ):
        self._allocator = allocator
        self.start = start
        self.block = block
        self._sentinel: socket.socket | None = sentinel

    def release(self) -> None:
        if self._sentinel is not None:
            self._sentinel.close()
            self._sentinel = None
            self._allocator._forget(self.start)


class PortAllocator:
    """Hands out disjoint blocks of free host ports, one per member.

    The default range stays below Linux's ephemeral range (32768+), where the kernel
    picks ports for outgoing connections and Ray's own randomly-bound helpers.
    """

    def __init__(self, first: int = 20000, last: int = 32767, block_size: int = 128) -> None:
        if last - first + 1 < block_size:
            raise ValueError("port range smaller than one block")
        self.first = first
        self.last = last
        self.block_size = block_size
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._next = first

    def allocate(self) -> PortLease:
        with self._lock:
            starts = list(range(self.first, self.last - self.block_size + 2, self.block_size))
            # Rotate so that a just-released block is not immediately reused (TIME_WAIT).
            pivot = next((i for i, s in enumerate(starts) if s >= self._next), 0)
            for start in starts[pivot:] + starts[:pivot]:
                if start in self._held:
                    continue
                lease = self._try(start)
                if lease is not None:
                    self._held.add(start)
                    self._next = start + self.block_size
                    return lease
        raise PortsExhausted(
            f"no free block of {self.block_size} ports in {self.first}-{self.last}"
        )

    def _try(self, start: int) -> PortLease | None:
        sentinel = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sentinel.bind(("0.0.0.0", start))
        except OSError:
            sentinel.close()
            return None
        block = PortBlock.at(start, self.block_size)
        if not all(port_is_free(p) for p in block.ports()):
            sentinel.close()
            return None
        return PortLease(self, start, block, sentinel)

    def _forget(self, start: int) -> None:
        with self._lock:
            self._held.discard(start)
