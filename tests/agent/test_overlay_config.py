"""A member's Nebula config: where it sends its UDP for the lighthouse, and no key in it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loom.agent.netns import MemberNet, host_addresses
from loom.agent.overlay import lighthouse_hosts, member_config
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
