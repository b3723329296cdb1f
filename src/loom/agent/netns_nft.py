"""The shared part of member networks: the host-wide lock, ``ip``/``nft`` calls and the
nftables table ``inet loom`` that every Loom agent on a machine shares (see netns.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TABLE = "loom"
#: Host-side veth names: ``loom`` + 10 hex digits (15 characters at most on Linux).
IF_PREFIX = "loom"
NETNS_DIR = Path("/run/netns")
LOCK_PATH = Path("/run/loom-netns.lock")
DEFAULT_RANGE = "10.201.0.0/16"

#: Destinations a member may never reach through the host (besides the host itself).
BLOCKED_V4: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # CGNAT (and Tailscale-style overlays)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata services)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking, often used inside data centers
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
)

_HEX = re.compile(r"^[0-9a-f]{10}$")


class NetnsError(RuntimeError):
    """A member's network namespace could not be created or removed; the message says why."""


def _run(argv: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(argv)}` could not run: {exc}") from None
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _nft(script: str, *, check: bool = True) -> str:
    return _run(["nft", "-f", "-"], stdin=script, check=check)


@contextlib.contextmanager
def host_lock(path: Path = LOCK_PATH) -> Iterator[None]:
    """The machine-wide lock around changes to addresses, namespaces and the table."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _links() -> list[dict[str, Any]]:
    out = _run(["ip", "-j", "link", "show"])
    return list(json.loads(out or "[]"))


def _member_ifs() -> set[str]:
    return {str(link["ifname"]) for link in _links() if _is_member_if(str(link["ifname"]))}


def _is_member_if(name: str) -> bool:
    return name.startswith(IF_PREFIX) and bool(_HEX.match(name[len(IF_PREFIX) :]))


def _used_addresses() -> set[ipaddress.IPv4Address]:
    out = _run(["ip", "-j", "-4", "addr", "show"])
    used: set[ipaddress.IPv4Address] = set()
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                used.add(ipaddress.IPv4Address(info["local"]))
    return used


def netns_names() -> list[str]:
    """Names of the network namespaces under /run/netns."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except OSError:
        return []


def _table_exists() -> bool:
    return (
        subprocess.run(
            ["nft", "list", "table", "inet", TABLE], capture_output=True, timeout=20, check=False
        ).returncode
        == 0
    )


def _ip_forward() -> bool:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"


def _write_sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path(path).write_text(value)


def table_script(*, forwarding_was_off: bool) -> str:
    """The nftables definition of ``table inet loom`` (created once per machine)."""
    blocked = ", ".join(BLOCKED_V4)
    # When Loom had to turn on IPv4 forwarding, it keeps the host from routing anything
    # else: only traffic from or to a member's veth is forwarded.
    other = '        iifname != "loom*" oifname != "loom*" drop\n' if forwarding_was_off else ""
    marker = "    set forwarding_was_off { type ipv4_addr; }\n" if forwarding_was_off else ""
    return f"""
table inet {TABLE} {{
    set blocked4 {{ type ipv4_addr; flags interval; elements = {{ {blocked} }}; }}
    set peers {{ type ifname . ifname; }}
    set egress_ifs {{ type ifname; }}
    set egress4 {{ type ipv4_addr; }}
    set overlay_out {{ type ifname . inet_service; }}
    set host_udp {{ type inet_service; }}
{marker}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname "loom*" ct state established,related accept
        iifname "loom*" udp dport @host_udp accept
        iifname "loom*" counter drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "loom*" jump from_member
        oifname "loom*" jump to_member
{other}    }}
    chain from_member {{
        ct state established,related accept
        meta nfproto ipv6 drop
        iifname . oifname @peers accept
        ip daddr @blocked4 counter drop
        oifname "loom*" counter drop
        iifname @egress_ifs accept
        iifname . udp sport @overlay_out accept
        counter drop
    }}
    chain to_member {{
        ct state established,related accept
        counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "loom*" return
        ip saddr @egress4 masquerade
    }}
}}
"""


def _ensure_table() -> None:
    if _table_exists():
        return
    was_off = not _ip_forward()
    _nft(table_script(forwarding_was_off=was_off))
    if was_off:
        log.info("enabled IPv4 forwarding for member namespaces (only their traffic is routed)")
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")


def _set_elements(set_name: str) -> list[Any]:
    out = _run(["nft", "-j", "list", "set", "inet", TABLE, set_name], check=False)
    if not out:
        return []
    for item in json.loads(out).get("nftables", []):
        if "set" in item:
            return list(item["set"].get("elem", []))
    return []


def _elem_names(elem: Any) -> list[str]:
    if isinstance(elem, dict) and "concat" in elem:
        return [str(x) for x in elem["concat"]]
    if isinstance(elem, dict) and "elem" in elem:
        return _elem_names(elem["elem"].get("val"))
    return [str(elem)]


def _gc_table(alive_ifs: set[str]) -> None:
    """Drop set elements of vanished members; the whole table once no member is left."""
    if not _table_exists():
        return
    if not alive_ifs:
        was_off = bool(
            _run(["nft", "list", "set", "inet", TABLE, "forwarding_was_off"], check=False)
        )
        _run(["nft", "delete", "table", "inet", TABLE])
        if was_off:
            _write_sysctl("/proc/sys/net/ipv4/ip_forward", "0")
        return
    lines: list[str] = []
    for elem in _set_elements("peers"):
        a, b = _elem_names(elem)[:2]
        if a not in alive_ifs or b not in alive_ifs:
            lines.append(f'delete element inet {TABLE} peers {{ "{a}" . "{b}" }}')
    for elem in _set_elements("egress_ifs"):
        (name,) = _elem_names(elem)[:1]
        if name not in alive_ifs:
            lines.append(f'delete element inet {TABLE} egress_ifs {{ "{name}" }}')
    for elem in _set_elements("overlay_out"):
        name, port = _elem_names(elem)[:2]
        if name not in alive_ifs:
            lines.append(f'delete element inet {TABLE} overlay_out {{ "{name}" . {port} }}')
    if lines:
        _nft("\n".join(lines) + "\n")


def _member_addresses(alive_ifs: set[str]) -> dict[str, str]:
    """Host-side veth name -> namespace address (host address + 1) of live members."""
    found: dict[str, str] = {}
    out = _run(["ip", "-j", "-4", "addr", "show"])
    for link in json.loads(out or "[]"):
        name = str(link.get("ifname", ""))
        if name in alive_ifs:
            for info in link.get("addr_info", []):
                with contextlib.suppress(ValueError, KeyError):
                    found[name] = str(ipaddress.IPv4Address(info["local"]) + 1)
    return found


def _gc_egress4(alive: dict[str, str]) -> list[str]:
    keep = set(alive.values())
    return [
        f"delete element inet {TABLE} egress4 {{ {addr} }}"
        for addr in (str(e) for e in _set_elements("egress4"))
        if addr not in keep
    ]


def _clusters_of_members() -> dict[str, str]:
    """Host-side veth name -> cluster id, for every member on this machine (any agent)."""
    found: dict[str, str] = {}
    for link in _links():
        name = str(link.get("ifname", ""))
        parts = str(link.get("ifalias", "")).split()
        if _is_member_if(name) and len(parts) == 3 and parts[0] == "loom":
            found[name] = parts[2]
    return found
