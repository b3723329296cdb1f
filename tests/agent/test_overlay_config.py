"""A member's Nebula config: where it sends its UDP for the lighthouse, and no key in it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loom.agent.netns import MemberNet, NetnsManager, host_addresses
from loom.agent.overlay import MemberOverlay, lighthouse_hosts, member_config
from loom.protocol.overlay import LighthouseRef, OverlayGrant

CRT = "-----BEGIN NEBULA CERTIFICATE-----\nAAAA\n-----END NEBULA CERTIFICATE-----\n"
NET = MemberNet("loom-x-0123456789", "loom0123456789", "10.201.0.1", "10.201.0.2", "c1", True)


def _grant(*addresses: str) -> OverlayGrant:
    return OverlayGrant(
        ca_crt=CRT,
        crt=CRT,
        overlay_ip="10.250.0.5",
        prefix_len=16,
        group="c1",
        lighthouse_ip="10.250.0.1",
        lighthouse_addresses=list(addresses),
        expires_at=0.0,
    )


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (the host's addresses)")
def test_a_lighthouse_on_this_host_is_reached_through_the_veth() -> None:
    own = sorted(a for a in host_addresses() if not a.startswith("127."))
    addresses = ["127.0.0.1:4242", "0.0.0.0:4243", "203.0.113.99:4244", "lh.example:4245"]
    if own:
        addresses.append(f"{own[0]}:4246")
    found, local = lighthouse_hosts(_grant(*addresses), NET)
    hosts = found["10.250.0.1"]
    # loopback / wildcard: the veth's host side; a public one as is; a name for Nebula.
    assert hosts[:4] == [
        "10.201.0.1:4242",
        "10.201.0.1:4243",
        "203.0.113.99:4244",
        "lh.example:4245",
    ]
    if own:  # one of the host's own addresses: that address (the lighthouse may bind it only)
        assert hosts[4] == f"{own[0]}:4246"
    assert local == ({4242, 4243, 4246} if own else {4242, 4243})


def test_the_config_points_at_the_agents_own_key_and_carries_none(tmp_path: Path) -> None:
    config = member_config(_grant("203.0.113.1:4242"), NET, tmp_path)
    pki = config["pki"]
    assert isinstance(pki, dict) and pki["key"] == str(tmp_path / "host.key")
    assert "PRIVATE" not in str(config)
    firewall = config["firewall"]
    assert isinstance(firewall, dict)
    assert firewall["inbound"] == [{"port": "any", "proto": "any", "group": "c1"}]


def test_every_lighthouse_of_the_network_is_a_host_and_a_relay(tmp_path: Path) -> None:
    """With coordinator replicas each runs a lighthouse: the member reports to all of them
    and may be relayed by any."""
    grant = _grant("203.0.113.1:4242").model_copy(
        update={
            "more_lighthouses": [
                LighthouseRef(ip="10.250.0.2", addresses=["203.0.113.2:4242"]),
                LighthouseRef(ip="10.250.0.3", addresses=["203.0.113.3:4242", "lh3.example:4242"]),
            ]
        }
    )
    config = member_config(grant, NET, tmp_path)
    assert config["static_host_map"] == {
        "10.250.0.1": ["203.0.113.1:4242"],
        "10.250.0.2": ["203.0.113.2:4242"],
        "10.250.0.3": ["203.0.113.3:4242", "lh3.example:4242"],
    }
    lighthouse, relay = config["lighthouse"], config["relay"]
    assert isinstance(lighthouse, dict) and isinstance(relay, dict)
    assert lighthouse["hosts"] == relay["relays"] == ["10.250.0.1", "10.250.0.2", "10.250.0.3"]
    # A grant without the new field (an older coordinator) still means one lighthouse.
    assert list(_grant("203.0.113.1:4242").lighthouses()) == ["10.250.0.1"]


def test_the_config_punches_back_within_the_first_handshake_try() -> None:
    """The peer's punch must come before Nebula's second try, when it first relays."""
    config = member_config(_grant("203.0.113.1:4242"), NET, Path("/nonexistent"))
    punchy, handshakes = config["punchy"], config["handshakes"]
    assert isinstance(punchy, dict) and isinstance(handshakes, dict)
    assert punchy["punch"] and punchy["respond"]
    assert _ms(punchy["delay"]) < _ms(handshakes["try_interval"]) / 2
    relay = config["relay"]
    assert isinstance(relay, dict) and relay["use_relays"] and relay["relays"] == ["10.250.0.1"]


def _ms(duration: object) -> float:
    text = str(duration)
    for unit, factor in (("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text.removesuffix(unit)) * factor
    raise AssertionError(f"unexpected duration {duration!r}")


#: Lines of Nebula 1.6.1's log (member h2 on the NAT topology), shortened where unread.
_RECEIVED = (
    'time="2026-12-01T20:46:58Z" level=info msg="Handshake message received" certName=h1 '
    'fingerprint=70a2 handshake="map[stage:1 style:ix_psk0]" initiatorIndex={index} '
    "issuer=98f8 remoteIndex=0 responderIndex=0 udpAddr={addr} vpnIp={peer}\n"
)
_ROAMED = (
    'time="2026-12-01T20:47:01Z" level=info msg="Host roamed to new udp ip/port." certName=h1 '
    'newAddr="198.51.100.11:4242" udpAddr="<nil>" vpnIp={peer}\n'
)


def _received(index: int, addr: str, peer: str = "10.250.1.1") -> str:
    return _RECEIVED.format(index=index, addr=addr, peer=peer)


def test_tunnels_read_from_the_log_direct_wins_within_one_handshake(tmp_path: Path) -> None:
    overlay = MemberOverlay(_grant("203.0.113.1:4242"), NET, tmp_path, NetnsManager("loom-t0"))
    log = overlay.log_path

    def add(*lines: str) -> dict[str, bool]:
        with open(log, "a") as f:
            f.write("".join(lines))
        return dict(overlay.read_tunnels())

    # The direct copy of a handshake, then the relay's copy of the same one: direct.
    log.write_text("")
    assert add(_received(1, '"198.51.100.11:4242"'), _received(1, '"<nil>"')) == {
        "10.250.1.1": False
    }
    assert not overlay.relayed
    # A peer behind a symmetric NAT: only the relay's copy arrives.
    assert add(_received(7, '"<nil>"', "10.250.1.3"))["10.250.1.3"] is True
    # The relay's copy first, a direct one of the same handshake later: Nebula takes it.
    assert add(_received(9, '"<nil>"', "10.250.1.4"))["10.250.1.4"] is True
    assert add(_received(9, '"198.51.100.14:4242"', "10.250.1.4"))["10.250.1.4"] is False
    # A new handshake replaces the tunnel, relayed this time ...
    assert add(_received(2, '"<nil>"'))["10.250.1.1"] is True
    # ... until the peer's packets come straight from it (Nebula roams to that address).
    assert add(_ROAMED.format(peer="10.250.1.1"))["10.250.1.1"] is False
    # The lighthouse is no peer; a half-written line waits for its end.
    assert "10.250.0.1" not in add(_received(3, '"203.0.113.1:4242"', "10.250.0.1"))
    with open(log, "a") as f:
        f.write(_received(4, '"<nil>"', "10.250.1.9")[:-40])
    assert "10.250.1.9" not in overlay.read_tunnels()
    assert add(_received(4, '"<nil>"', "10.250.1.9")[-40:])["10.250.1.9"] is True
    # Only a member all of whose tunnels are relayed is reported relayed.
    assert not overlay.relayed


def test_the_config_gives_nebulas_socket_large_buffers() -> None:
    """The system's default receive buffer lost datagrams of a bulk stream (bench/overlay.py)."""
    listen = member_config(_grant("203.0.113.1:4242"), NET, Path("/nonexistent"))["listen"]
    assert isinstance(listen, dict)
    assert listen["read_buffer"] >= 8 << 20 and listen["write_buffer"] >= 8 << 20
