"""The coordinator as overlay authority: CA, addresses, certificates, a supervised
lighthouse (real ``nebula-cert`` and ``nebula``; no root needed: the lighthouse has no tun)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from loom.coordinator.overlay.authority import (
    Authority,
    OverlayConfigError,
    OverlaySettings,
    fingerprint,
)
from loom.coordinator.overlay.lighthouse import Lighthouse
from loom.protocol.commands import BadCommand, MemberOverlayBlocklist, parse_command
from loom.protocol.overlay import OverlayError, OverlayGrant, grant_from_args, grant_to_args
from support.servers import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("nebula") is None or shutil.which("nebula-cert") is None,
    reason="Nebula is not installed (apt-get install nebula)",
)


def _settings(tmp_path: Path, **kw: str) -> OverlaySettings:
    values = {"listen": f"127.0.0.1:{free_port()}", "advertise": "", "network": "10.250.0.0/24"}
    values.update(kw)
    return OverlaySettings(data_dir=tmp_path / "overlay", **values)  # type: ignore[arg-type]


def _public_key(tmp_path: Path) -> str:
    """A public key as an agent generates it (nebula-cert keygen); the key stays there."""
    key, pub = tmp_path / "agent.key", tmp_path / "agent.pub"
    key.unlink(missing_ok=True)
    pub.unlink(missing_ok=True)
    subprocess.run(
        ["nebula-cert", "keygen", "-out-key", str(key), "-out-pub", str(pub)], check=True
    )
    return pub.read_text()


def test_ca_addresses_and_member_certificates(tmp_path: Path) -> None:
    authority = Authority(_settings(tmp_path))
    pub = _public_key(tmp_path)
    mode = stat.S_IMODE(os.stat(authority.ca_key_path).st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_IMODE(os.stat(authority.dir).st_mode) == 0o700
    g1 = authority.grant("c-1", "m-a", None, pub)
    g2 = authority.grant("c-1", "m-b", None, pub)
    g3 = authority.grant("c-2", "m-c", None, pub)
    assert len({g1.overlay_ip, g2.overlay_ip, g3.overlay_ip, authority.lighthouse_ip}) == 4
    assert authority.grant("c-1", "m-a", None, pub).overlay_ip == g1.overlay_ip  # stable
    assert "PRIVATE KEY" not in g1.model_dump_json()  # no CA key, no member key
    with pytest.raises(ValueError):  # a grant carrying a private key is refused
        OverlayGrant.model_validate({**g1.model_dump(), "key": "x"})
    # The certificate says who and which cluster (nebula-cert's own reading of it).
    crt = tmp_path / "m.crt"
    crt.write_text(g1.crt)
    shown = subprocess.run(
        ["nebula-cert", "print", "-json", "-path", str(crt)], capture_output=True, text=True
    ).stdout
    assert '"name":"m-a"' in shown.replace(" ", "") and '"c-1"' in shown
    assert f"{g1.overlay_ip}/24" in shown
    # The grant travels in member.start and is read back typed; tampering is refused.
    args = grant_to_args({"member_id": "m-a"}, g1)
    assert grant_from_args(args) == g1
    with pytest.raises(OverlayError, match=r"overlay\.overlay_ip"):
        grant_from_args({"overlay": {**args["overlay"], "overlay_ip": "not an ip"}})
    # Renewal: due once less than a third of the lifetime is left; same key, address, group.
    now = time.time()
    assert authority.due(now) == []
    assert authority.due(now + 0.7 * 3600 * 4) == ["m-a", "m-b", "m-c"]
    renewal = authority.renew("m-a", None, now + 3 * 3600)
    assert renewal is not None and renewal.expires_at == pytest.approx(now + 7 * 3600, abs=5)
    crt.write_text(renewal.crt)
    again_shown = subprocess.run(
        ["nebula-cert", "print", "-json", "-path", str(crt)], capture_output=True, text=True
    ).stdout
    assert (
        json.loads(again_shown)["details"]["publicKey"] == json.loads(shown)["details"]["publicKey"]
    )
    authority.renewed(renewal, now + 3 * 3600)
    assert "m-a" not in authority.due(now + 3.5 * 3600)
    # A restarted coordinator keeps its CA and its address book (keys, expiries too).
    again = Authority(_settings(tmp_path))
    assert again.ca_crt == authority.ca_crt and again.address_of("m-c") == g3.overlay_ip
    assert again.entry("m-a") == authority.entry("m-a")
    assert sorted(again.release_cluster("c-1")) == ["m-a", "m-b"]
    assert again.address_of("m-a") is None


def test_bad_overlay_options_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(OverlayConfigError, match="--overlay-network"):
        Authority(_settings(tmp_path, network="8.8.8.0/24"))
    with pytest.raises(OverlayConfigError, match="HOST:PORT"):
        _settings(tmp_path, listen="4242").listen_port  # noqa: B018


async def test_lighthouse_is_restarted_when_it_dies(tmp_path: Path) -> None:
    lighthouse = Lighthouse(Authority(_settings(tmp_path)))
    await lighthouse.start()
    task = asyncio.create_task(lighthouse.run())
    try:
        first = lighthouse.proc
        assert first is not None and first.returncode is None
        os.kill(first.pid, signal.SIGKILL)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if lighthouse.proc is not None and lighthouse.proc.pid != first.pid:
                break
        assert lighthouse.restarts == 1 and lighthouse.proc is not None
        assert lighthouse.proc.returncode is None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert lighthouse.proc is None  # stopped with its supervisor


async def test_revocation_blocks_every_certificate_of_a_holder_until_it_expires(
    tmp_path: Path,
) -> None:
    authority = Authority(_settings(tmp_path))
    pub = _public_key(tmp_path)
    now = time.time()
    first = authority.grant("c-1", "m-a", None, pub, now)
    authority.grant("c-1", "m-b", None, pub, now)
    user = authority.grant("c-1", "u-1", None, pub, now)
    authority.grant("c-2", "m-c", None, pub, now)
    # m-a holds two certificates now (a shorter one: the cluster ends in 30 min).
    renewal = authority.renew("m-a", now + 3 * 3600 + 1800, now + 3 * 3600)
    assert renewal is not None
    assert first.blocklist == []
    # Revoking m-a blocks both of its certificates (it has both) and frees its address.
    blocked = authority.revoke(["m-a"], now + 3 * 3600)
    assert sorted(blocked) == sorted([fingerprint(first.crt), fingerprint(renewal.crt)])
    assert authority.address_of("m-a") is None and authority.revoke(["m-a"]) == []
    assert authority.blocklist("c-1", now + 3 * 3600) == sorted(blocked)
    assert authority.blocklist("c-2", now + 3 * 3600) == []
    # A later member of the cluster gets the list in its grant.
    late = authority.grant("c-1", "m-d", None, pub, now + 3 * 3600)
    assert late.blocklist == sorted(blocked)
    assert late.overlay_ip != first.overlay_ip  # not reused while m-a's certificate lives
    # The cluster's end blocks the rest (user certificates too); a restart keeps the list.
    assert sorted(authority.release_cluster("c-1", now + 3 * 3600)) == ["m-b", "m-d", "u-1"]
    again = Authority(_settings(tmp_path))
    listed = again.blocklist(None, now + 3 * 3600)
    assert fingerprint(user.crt) in listed and len(listed) == 5
    assert again.blocked_clusters(now + 3 * 3600) == ["c-1"]
    # The lighthouse reads the list at start and reloads it on SIGHUP (logged by Nebula).
    lighthouse = Lighthouse(again)
    await lighthouse.start()
    try:
        config = json.loads(lighthouse.config_path.read_text())
        assert config["pki"]["blocklist"] == again.blocklist() == listed
        assert config["pki"]["disconnect_invalid"] is True
        assert await lighthouse.reload(), lighthouse.log_tail()
        assert lighthouse.log_path.read_text().count("Blocklisting cert") == 2 * len(listed)
    finally:
        await lighthouse.stop()
    # An expired certificate needs no blocking: the first one drops out after 4 h.
    assert fingerprint(first.crt) not in again.blocklist(None, now + 4 * 3600 + 1)
    assert again.blocklist(None, now + 30 * 3600) == []
    with pytest.raises(ValueError, match="Nebula certificate"):
        fingerprint("hello")


def test_a_bad_fingerprint_is_a_clear_error() -> None:
    good = "ab" * 32
    assert MemberOverlayBlocklist(cluster_id="c-1", fingerprints=[good]).fingerprints == [good]
    for bad in ("AB" * 32, "ab" * 31, "x"):
        with pytest.raises(BadCommand, match=r"args\.fingerprints: .*64 lowercase hex"):
            parse_command("member.overlay_blocklist", {"cluster_id": "c", "fingerprints": [bad]})
