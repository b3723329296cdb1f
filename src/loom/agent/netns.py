"""A network namespace per member: the sandbox's own network (see docs/overlay.md).

When the agent can administer the network (root, CAP_NET_ADMIN), every member's Ray node
runs in a named network namespace of its own::

    host                                   netns loom-<agent>-<member>
    loom<member> 10.201.X.1/30  <--veth-->  eth0 10.201.X.2/30, lo, default via .1

and one nftables table shared by every Loom agent on the machine, ``table inet loom``
(Loom never touches any other table), decides what a member may reach:

* the host itself (any of its addresses, loopback services, the agent's metrics port):
  nothing, except replies to connections the host opened (the agent's readiness probe
  and tunnel) and the UDP ports the overlay needs (:attr:`NetnsConfig.host_udp_ports`);
* another member on this host: only one of the *same cluster* (set ``peers``);
* private, link-local, loopback, multicast, CGNAT and reserved ranges (the supplier's
  LAN): nothing;
* the public internet: NAT'd (masquerade) only if the supplier allows egress
  (``loom worker start --egress internet``, the default); with ``none``, only the
  overlay's own UDP port (:attr:`NetnsConfig.overlay_udp_port`) may leave.

IPv6 is disabled inside the namespace. Nothing about a member survives it: ``destroy``
removes the namespace (and with it the veth pair) and the member's set elements, and the
table itself goes with the last member on the host; :meth:`NetnsManager.cleanup_leftovers`
does the same for the members of a crashed agent. Every change to the shared state runs
under a host-wide lock (several agents share a machine in ``loom up``).

Addresses come from a configurable private range (default ``10.201.0.0/16``): one /30
per member, the first free one (checked against every address on the host).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loom.agent.netns_nft import (
    _HEX,
    BLOCKED_V4,
    IF_PREFIX,
    NETNS_DIR,
    TABLE,
    NetnsError,
    _clusters_of_members,
    _ensure_table,
    _gc_egress4,
    _gc_table,
    _is_member_if,
    _links,
    _member_addresses,
    _member_ifs,
    _nft,
    _run,
    _table_exists,
    _used_addresses,
    _write_sysctl,
    host_lock,
    netns_names,
)

__all__ = [
    "BLOCKED_V4",
    "IF_PREFIX",
    "NETNS_DIR",
    "TABLE",
    "MemberNet",
    "NetnsConfig",
    "NetnsError",
    "NetnsManager",
    "driver_prefix",
    "for_agent",
    "host_addresses",
    "host_lock",
    "namespace_of",
    "netns_names",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

Egress = Literal["internet", "none"]
EGRESS_CHOICES: tuple[str, ...] = ("internet", "none")
DEFAULT_RANGE = "10.201.0.0/16"
#: An empty member namespace older than this belongs to an agent that was killed.
ORPHAN_AGE_S = 600.0
_ORPHAN = re.compile(r"^loom-[0-9a-f]{6}-([0-9a-f]{10})$")

_NAME = re.compile(r"^[a-z0-9-]{1,40}$")


@dataclass(frozen=True)
class NetnsConfig:
    """How members' namespaces are built on this machine (``loom worker start`` options)."""

    address_range: str = DEFAULT_RANGE
    egress: str = "internet"  # internet | none
    #: UDP ports on the host a member may reach (the coordinator's Nebula lighthouse when
    #: it shares the machine).
    host_udp_ports: tuple[int, ...] = ()
    #: The member's own overlay UDP port: allowed to the internet even with egress none.
    overlay_udp_port: int | None = None

    def __post_init__(self) -> None:
        if self.egress not in EGRESS_CHOICES:
            raise ValueError(f"egress must be internet or none, not {self.egress!r}")
        net = self.network
        if not net.is_private or net.prefixlen > 28:
            raise ValueError(
                f"the member address range {self.address_range} must be a private IPv4 "
                "range of at least /28, e.g. 10.201.0.0/16"
            )
        ports = [*self.host_udp_ports]
        if self.overlay_udp_port is not None:
            ports.append(self.overlay_udp_port)
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"bad UDP port {port}")

    @property
    def network(self) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(self.address_range, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"bad member address range {self.address_range!r}: {exc} (e.g. 10.201.0.0/16)"
            ) from None


@dataclass(frozen=True)
class MemberNet:
    """One member's namespace: what the runtime enters and what Ray binds."""

    name: str
    host_if: str
    host_ip: str
    ns_ip: str
    cluster_id: str
    egress: bool

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name


def unavailable_reason() -> str | None:
    """None if this process can build member namespaces, else why not."""
    if os.geteuid() != 0:
        return "the agent is not root (no CAP_NET_ADMIN)"
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 nftables)"
    return None


# ----------------------------------------------------------------------------- manager


class NetnsManager:
    """Creates and removes the namespaces of one agent's members (blocking calls).

    ``agent_tag`` (from :func:`loom.agent.raynode_spec.agent_tag`) prefixes the
    namespace names, so that a restarted agent finds and removes what it left.
    """

    def __init__(self, agent_tag: str, config: NetnsConfig | None = None) -> None:
        if not _NAME.match(agent_tag):
            raise ValueError(f"bad agent tag {agent_tag!r}")
        self.agent_tag = agent_tag
        self.config = config or NetnsConfig()

    def names_for(self, short_id: str) -> tuple[str, str]:
        """(namespace name, host-side veth name) of the member with this short id."""
        if not _HEX.match(short_id):
            raise ValueError(f"member short id must be 10 hex digits, not {short_id!r}")
        return f"{self.agent_tag}-{short_id}", f"{IF_PREFIX}{short_id}"

    def _allocate(self, short_id: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        net = self.config.network
        used = _used_addresses()
        blocks = net.num_addresses // 4
        start = int(hashlib.sha256(short_id.encode()).hexdigest(), 16) % blocks
        for i in range(blocks):
            base = net.network_address + 4 * ((start + i) % blocks)
            host, ns = base + 1, base + 2
            if not {base, host, ns, base + 3} & used:
                return host, ns
        raise NetnsError(f"no free /30 left in the member address range {net}: choose a larger one")

    def create(self, short_id: str, cluster_id: str, *, egress: bool | None = None) -> MemberNet:
        """Build the member's namespace, veth pair, addresses, routes and rules."""
        name, host_if = self.names_for(short_id)
        allow = self.config.egress == "internet" if egress is None else egress
        with host_lock():
            self._remove(name, host_if)  # a leftover with the same name
            self._remove_orphans()
            _ensure_table()
            host_ip, ns_ip = self._allocate(short_id)
            try:
                self._build(name, host_if, cluster_id, host_ip, ns_ip, allow)
            except NetnsError:
                self._remove(name, host_if)
                _gc_table(_member_ifs())
                raise
        return MemberNet(name, host_if, str(host_ip), str(ns_ip), cluster_id, allow)

    def _build(
        self,
        name: str,
        host_if: str,
        cluster_id: str,
        host_ip: ipaddress.IPv4Address,
        ns_ip: ipaddress.IPv4Address,
        egress: bool,
    ) -> None:
        ns = ["ip", "-n", name]
        _run(["ip", "netns", "add", name])
        # The peer is created inside the namespace: no moment where it sits on the host.
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name])
        _run(["ip", "link", "set", host_if, "alias", f"loom {self.agent_tag} {cluster_id}"])
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6", "1")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{host_if}/rp_filter", "1")
        _run(["ip", "addr", "add", f"{host_ip}/30", "dev", host_if])
        _run(["ip", "link", "set", host_if, "up"])
        _run(
            [
                "nsenter",
                f"--net={NETNS_DIR / name}",
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
        )
        _run([*ns, "addr", "add", f"{ns_ip}/30", "dev", "eth0"])
        _run([*ns, "link", "set", "lo", "up"])
        _run([*ns, "link", "set", "eth0", "up"])
        _run([*ns, "route", "add", "default", "via", str(host_ip)])
        lines = []
        for other, other_cluster in _clusters_of_members().items():
            if other != host_if and other_cluster == cluster_id:
                lines.append(
                    f'add element inet {TABLE} peers {{ "{host_if}" . "{other}", '
                    f'"{other}" . "{host_if}" }}'
                )
        if egress:
            lines.append(f'add element inet {TABLE} egress_ifs {{ "{host_if}" }}')
        if egress or self.config.overlay_udp_port:
            lines.append(f"add element inet {TABLE} egress4 {{ {ns_ip} }}")
        if self.config.overlay_udp_port:
            lines.append(
                f'add element inet {TABLE} overlay_out {{ "{host_if}" . '
                f"{self.config.overlay_udp_port} }}"
            )
        for port in self.config.host_udp_ports:
            lines.append(f"add element inet {TABLE} host_udp {{ {port} }}")
        if lines:
            _nft("\n".join(lines) + "\n")

    def allow_overlay(self, net: MemberNet, port: int, host_ports: set[int]) -> None:
        """Let the member's Nebula out: its UDP ``port`` to the internet (even with egress
        none) and to ``host_ports`` of this host (a lighthouse on the same machine)."""
        lines = [
            f'add element inet {TABLE} overlay_out {{ "{net.host_if}" . {port} }}',
            f"add element inet {TABLE} egress4 {{ {net.ns_ip} }}",
        ]
        lines += [f"add element inet {TABLE} host_udp {{ {p} }}" for p in sorted(host_ports)]
        with host_lock():
            _nft("\n".join(lines) + "\n")

    def destroy(self, net: MemberNet) -> None:
        """Remove the member's namespace, veth and rules (idempotent)."""
        with host_lock():
            self._remove(net.name, net.host_if)
            self._gc()

    def _remove(self, name: str, host_if: str) -> None:
        if (NETNS_DIR / name).exists():
            _kill_inside(name)
            _run(["ip", "netns", "del", name])
        if host_if in _member_ifs():
            _run(["ip", "link", "del", host_if], check=False)
        if (NETNS_DIR / name).exists() or host_if in _member_ifs():
            raise NetnsError(f"could not remove the network namespace {name} of a member")

    def _gc(self) -> None:
        alive = _member_ifs()
        _gc_table(alive)
        if alive and _table_exists():
            lines = _gc_egress4(_member_addresses(alive))
            if lines:
                _nft("\n".join(lines) + "\n")

    def cleanup_leftovers(self) -> list[str]:
        """Remove every namespace this agent left (after a crash); returns their names."""
        prefix = self.agent_tag + "-"
        stale = [n for n in netns_names() if n.startswith(prefix)]
        with host_lock():
            for name in stale:
                short = name[len(prefix) :]
                host_if = f"{IF_PREFIX}{short}" if _HEX.match(short) else ""
                if host_if:
                    self._remove(name, host_if)
                else:
                    _run(["ip", "netns", "del", name], check=False)
            for link in _links():
                alias = str(link.get("ifalias", ""))
                if _is_member_if(str(link["ifname"])) and alias.startswith(
                    f"loom {self.agent_tag} "
                ):
                    _run(["ip", "link", "del", str(link["ifname"])], check=False)
            stale += self._remove_orphans()
            self._gc()
        return stale

    def _remove_orphans(
        self, min_age_s: float = ORPHAN_AGE_S, only: frozenset[str] | None = None
    ) -> list[str]:
        """Remove any agent's member namespace that is empty and old (its agent was killed
        and never came back with the same directory). A live member always has a process
        inside (Ray, Nebula) within seconds of its creation. Call under the host lock."""
        removed = []
        now = time.time()
        for name in netns_names():
            found = _ORPHAN.match(name)
            if not found or (only is not None and name not in only):
                continue
            try:
                age = now - (NETNS_DIR / name).stat().st_mtime
            except OSError:
                continue
            if age < min_age_s or _run(["ip", "netns", "pids", name], check=False).split():
                continue
            self._remove(name, f"{IF_PREFIX}{found.group(1)}")
            removed.append(name)
        if removed:
            self._gc()
            log.info("removed empty member namespaces of vanished agents: %s", removed)
        return removed


def for_agent(base_dir: Path, runtime: str, config: NetnsConfig) -> NetnsManager | None:
    """The agent's namespace builder, or None (logged loudly) where members share the host's."""
    from loom.agent.raynode_spec import agent_tag

    reason = unavailable_reason()
    if reason is None and runtime != "bwrap":
        reason = f"the {runtime} runtime does not run members in a network namespace"
    if reason is not None:
        log.warning(
            "members share this host's network (%s): jobs can reach services on this "
            "host's loopback (databases, the agent's metrics port) and its LAN; run the "
            "agent as root with the bwrap runtime to give each member its own network",
            reason,
        )
        return None
    return NetnsManager(agent_tag(base_dir), config)


def namespace_of(address: str, prefixes: tuple[str, ...] = ("loom-",)) -> Path | None:
    """The namespace of the local member whose address is ``address`` (``host[:port]``).

    For tools on the supplier's machine (the demo, tests) that run a Ray driver against a
    local cluster: a Ray driver attaches to the raylet of its own address, and members
    cannot open connections to the host (Ray workers call the driver back), so such a
    driver runs inside the head's namespace. Users elsewhere use the Jobs API instead.
    """
    host = address.rpartition(":")[0] if address.count(":") == 1 else address
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    if shutil.which("ip") is None:
        return None
    try:
        members = _member_addresses(_member_ifs())
    except NetnsError:
        return None
    for host_if, ns_ip in members.items():
        if ns_ip == str(ip):
            suffix = "-" + host_if[len(IF_PREFIX) :]
            for name in netns_names():
                if name.endswith(suffix):
                    return NETNS_DIR / name
    # An overlay address (or a member of an agent in another namespace): ask each one.
    for name in netns_names():
        if name.startswith(prefixes):
            out = _run(["ip", "-n", name, "-j", "-4", "addr", "show"], check=False)
            if f'"{ip}"' in out:
                return NETNS_DIR / name
    return None


def driver_prefix(address: str, prefixes: tuple[str, ...] = ("loom-",)) -> list[str]:
    """``nsenter --net=…`` for a Ray driver on this machine aimed at a local member, else [].

    Overlay addresses are unique per coordinator only: with several coordinators on one
    machine (tests), give ``prefixes`` (agent tags) to pick the right namespace.
    """
    path = namespace_of(address, prefixes)
    return [] if path is None else ["nsenter", f"--net={path}"]


def host_addresses() -> set[str]:
    """Every IPv4 address of this host (its own network namespace)."""
    return {str(a) for a in _used_addresses()}


def _kill_inside(name: str) -> None:
    """SIGKILL whatever still runs in a member's namespace (its Nebula, a leftover)."""
    out = _run(["ip", "netns", "pids", name], check=False)
    for pid in out.split():
        if pid.isdigit():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)
