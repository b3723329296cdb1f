"""The coordinator as overlay authority: CA, addresses, certificates, a supervised
lighthouse (real ``nebula-cert`` and ``nebula``; no root needed: the lighthouse has no tun).

The book (addresses, certificates, revocations, lighthouses) is in the database, shared by
replicas: these run on both SQLite and PostgreSQL (``LOOM_TEST_DB``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.overlay.authority import (
    LIGHTHOUSE_SLOTS,
    Authority,
    OverlayConfigError,
    OverlaySettings,
    fingerprint,
)
from loom.coordinator.overlay.book import LIGHTHOUSE_TTL_S, Book
from loom.coordinator.overlay.legacy import import_files
from loom.coordinator.overlay.lighthouse import Lighthouse
from loom.protocol.commands import BadCommand, MemberOverlayBlocklist, parse_command
from loom.protocol.overlay import OverlayError, OverlayGrant, grant_from_args, grant_to_args
from support.servers import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("nebula") is None or shutil.which("nebula-cert") is None,
    reason="Nebula is not installed (apt-get install nebula)",
)


def _settings(tmp_path: Path, dirname: str = "overlay", **kw: str) -> OverlaySettings:
    values = {"listen": f"127.0.0.1:{free_port()}", "advertise": "", "network": "10.250.0.0/24"}
    values.update(kw)
    return OverlaySettings(data_dir=tmp_path / dirname, **values)  # type: ignore[arg-type]


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(db_url)
    await migrate(engine)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


async def _book(
    authority: Authority, sessions: async_sessionmaker[AsyncSession], replica: str = "r1"
) -> Book:
    """A replica's book: its CA recorded for the network, its lighthouse slot claimed."""
    book = Book(authority, sessions)
    await book.register_ca(replica)
    await book.claim_lighthouse(authority.settings.advertised(), replica)
    return book


def _printed(tmp_path: Path, crt_pem: str) -> str:
    """``nebula-cert print -json`` of a certificate: Nebula's own reading of it."""
    crt = tmp_path / "m.crt"
    crt.write_text(crt_pem)
    return subprocess.run(
        ["nebula-cert", "print", "-json", "-path", str(crt)], capture_output=True, text=True
    ).stdout


def _public_key(tmp_path: Path) -> str:
    """A public key as an agent generates it (nebula-cert keygen); the key stays there."""
    key, pub = tmp_path / "agent.key", tmp_path / "agent.pub"
    key.unlink(missing_ok=True)
    pub.unlink(missing_ok=True)
    subprocess.run(
        ["nebula-cert", "keygen", "-out-key", str(key), "-out-pub", str(pub)], check=True
    )
    return pub.read_text()


async def test_ca_addresses_and_member_certificates(
    tmp_path: Path, sessions: async_sessionmaker[AsyncSession]
) -> None:
    authority = Authority(_settings(tmp_path))
    book = await _book(authority, sessions)
    pub = _public_key(tmp_path)
    mode = stat.S_IMODE(os.stat(authority.ca_key_path).st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_IMODE(os.stat(authority.dir).st_mode) == 0o700
    g1 = await book.grant("c-1", "m-a", None, pub)
    g2 = await book.grant("c-1", "m-b", None, pub)
    g3 = await book.grant("c-2", "m-c", None, pub)
    assert g1.lighthouse_ip == authority.lighthouse_ip(0) == "10.250.0.1"
    assert len({g1.overlay_ip, g2.overlay_ip, g3.overlay_ip, g1.lighthouse_ip}) == 4
    # Members' addresses start after the lighthouses' reserved slots.
    assert g1.overlay_ip == f"10.250.0.{1 + LIGHTHOUSE_SLOTS}"
    assert (await book.grant("c-1", "m-a", None, pub)).overlay_ip == g1.overlay_ip  # stable
    assert "PRIVATE KEY" not in g1.model_dump_json()  # no CA key, no member key
    with pytest.raises(ValueError):  # a grant carrying a private key is refused
        OverlayGrant.model_validate({**g1.model_dump(), "key": "x"})
    # The certificate says who and which cluster (nebula-cert's own reading of it).
    shown = _printed(tmp_path, g1.crt)
    assert '"name":"m-a"' in shown.replace(" ", "") and '"c-1"' in shown
    assert f"{g1.overlay_ip}/24" in shown
    # The grant travels in member.start and is read back typed; tampering is refused.
    args = grant_to_args({"member_id": "m-a"}, g1)
    assert grant_from_args(args) == g1
    with pytest.raises(OverlayError, match=r"overlay\.overlay_ip"):
        grant_from_args({"overlay": {**args["overlay"], "overlay_ip": "not an ip"}})
    # Renewal: due once less than a third of the lifetime is left; same key, address, group.
    now = time.time()
    assert await book.due(now) == []
    assert await book.due(now + 0.7 * 3600 * 4) == ["m-a", "m-b", "m-c"]
    renewal = await book.renew("m-a", None, now + 3 * 3600)
    assert renewal is not None and renewal.expires_at == pytest.approx(now + 7 * 3600, abs=5)
    again_shown = _printed(tmp_path, renewal.crt)
    assert (
        json.loads(again_shown)["details"]["publicKey"] == json.loads(shown)["details"]["publicKey"]
    )
    await book.renewed(renewal, now + 3 * 3600)
    assert "m-a" not in await book.due(now + 3.5 * 3600)
    # A restarted coordinator keeps its CA and its address book (keys, expiries too).
    again = await _book(Authority(_settings(tmp_path)), sessions)
    assert again.authority.ca_crt == authority.ca_crt
    assert await again.address_of("m-c") == g3.overlay_ip
    assert await again.entry("m-a") == await book.entry("m-a")
    assert sorted(await again.release_cluster("c-1")) == ["m-a", "m-b"]
    assert await again.address_of("m-a") is None


def test_bad_overlay_options_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(OverlayConfigError, match="--overlay-network"):
        Authority(_settings(tmp_path, network="8.8.8.0/24"))
    with pytest.raises(OverlayConfigError, match="no overlay CA"):
        Authority(_settings(tmp_path, "elsewhere"), create=False)
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
    tmp_path: Path, sessions: async_sessionmaker[AsyncSession]
) -> None:
    book = await _book(Authority(_settings(tmp_path)), sessions)
    pub = _public_key(tmp_path)
    now = time.time()
    first = await book.grant("c-1", "m-a", None, pub, now)
    await book.grant("c-1", "m-b", None, pub, now)
    user = await book.grant("c-1", "u-1", None, pub, now)
    await book.grant("c-2", "m-c", None, pub, now)
    # m-a holds two certificates now (a shorter one: the cluster ends in 30 min).
    renewal = await book.renew("m-a", now + 3 * 3600 + 1800, now + 3 * 3600)
    assert renewal is not None
    assert first.blocklist == []
    # Revoking m-a blocks both of its certificates (it has both) and frees its address.
    blocked = await book.revoke(["m-a"], now + 3 * 3600)
    assert sorted(blocked) == sorted([fingerprint(first.crt), fingerprint(renewal.crt)])
    assert await book.address_of("m-a") is None and await book.revoke(["m-a"]) == []
    assert await book.blocklist("c-1", now + 3 * 3600) == sorted(blocked)
    assert await book.blocklist("c-2", now + 3 * 3600) == []
    # A later member of the cluster gets the list in its grant.
    late = await book.grant("c-1", "m-d", None, pub, now + 3 * 3600)
    assert late.blocklist == sorted(blocked)
    assert late.overlay_ip != first.overlay_ip  # not reused while m-a's certificate lives
    # A renewal for a revoked holder is refused (and nothing unblocked is left behind).
    assert await book.renew("m-a", None, now + 3 * 3600) is None
    # The cluster's end blocks the rest (user certificates too); a restart keeps the list.
    assert sorted(await book.release_cluster("c-1", now + 3 * 3600)) == ["m-b", "m-d", "u-1"]
    again = await _book(Authority(_settings(tmp_path)), sessions)
    listed = await again.blocklist(None, now + 3 * 3600)
    assert fingerprint(user.crt) in listed and len(listed) == 5
    assert await again.blocked_clusters(now + 3 * 3600) == ["c-1"]
    revoked = await again.revoked(fingerprint(user.crt))
    assert revoked is not None and revoked.holder == "u-1" and revoked.cluster == "c-1"
    # The lighthouse reads the list at start and reloads it on SIGHUP (logged by Nebula).
    lighthouse = Lighthouse(again.authority)
    lighthouse.blocklist = listed
    await lighthouse.start()
    try:
        config = json.loads(lighthouse.config_path.read_text())
        assert config["pki"]["blocklist"] == listed
        assert config["pki"]["disconnect_invalid"] is True
        assert await lighthouse.reload(await again.blocklist()), lighthouse.log_tail()
        assert lighthouse.log_path.read_text().count("Blocklisting cert") == 2 * len(listed)
    finally:
        await lighthouse.stop()
    # An expired certificate needs no blocking: the first one drops out after 4 h.
    assert fingerprint(first.crt) not in await again.blocklist(None, now + 4 * 3600 + 1)
    assert await again.blocklist(None, now + 30 * 3600) == []
    with pytest.raises(ValueError, match="Nebula certificate"):
        fingerprint("hello")


def test_a_bad_fingerprint_is_a_clear_error() -> None:
    good = "ab" * 32
    assert MemberOverlayBlocklist(cluster_id="c-1", fingerprints=[good]).fingerprints == [good]
    for bad in ("AB" * 32, "ab" * 31, "x"):
        with pytest.raises(BadCommand, match=r"args\.fingerprints: .*64 lowercase hex"):
            parse_command("member.overlay_blocklist", {"cluster_id": "c", "fingerprints": [bad]})


def _copy_ca(source: Authority, tmp_path: Path, dirname: str) -> Path:
    """What an operator does for a second replica: the first one's ca.crt and ca.key."""
    target = tmp_path / dirname
    target.mkdir(mode=0o700)
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(source.dir / name, target / name)
    return target


def _verifies(tmp_path: Path, ca: Path, crt_pem: str) -> bool:
    crt = tmp_path / "verify.crt"
    crt.write_text(crt_pem)
    done = subprocess.run(
        ["nebula-cert", "verify", "-ca", str(ca), "-crt", str(crt)], capture_output=True
    )
    return done.returncode == 0


async def test_two_replicas_sign_from_one_book(
    tmp_path: Path, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Replicas share the book in the database and the CA the operator copied: they sign
    at once without giving one address twice, each runs a lighthouse every grant names,
    and what one revokes the other blocks."""
    first = Authority(_settings(tmp_path, listen="127.0.0.1:4301"))
    _copy_ca(first, tmp_path, "r2")
    second = Authority(_settings(tmp_path, "r2", listen="127.0.0.1:4302"))
    a, b = await _book(first, sessions, "r1"), await _book(second, sessions, "r2")
    pub = _public_key(tmp_path)
    grants = await asyncio.gather(
        *((a if i % 2 else b).grant("c-1", f"m-{i}", None, pub) for i in range(12))
    )
    assert len({g.overlay_ip for g in grants}) == 12  # the unique index settles races
    assert all(_verifies(tmp_path, first.ca_crt_path, g.crt) for g in grants)
    # Both lighthouses, in slot order, in every grant (either replica's).
    for grant in (grants[0], grants[1]):
        assert grant.lighthouses() == {
            "10.250.0.1": ["127.0.0.1:4301"],
            "10.250.0.2": ["127.0.0.1:4302"],
        }
    # Revoked through r1: r2's blocklist (its lighthouse's, its members') has it; r2 will
    # not renew it; its address is not r2's to give out while the certificate lives.
    blocked = await a.revoke(["m-3"])
    assert blocked == [fingerprint(grants[3].crt)]
    assert await b.blocklist("c-1") == blocked and await b.blocklist() == blocked
    assert await b.renew("m-3", None, time.time()) is None
    later = await b.grant("c-1", "m-late", None, pub)
    assert later.overlay_ip not in {g.overlay_ip for g in grants}
    assert later.blocklist == blocked


async def test_a_replica_with_another_ca_is_refused_with_what_to_copy(
    tmp_path: Path, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await _book(Authority(_settings(tmp_path)), sessions, "r1")
    stranger = Book(Authority(_settings(tmp_path, "other")), sessions)
    with pytest.raises(
        OverlayConfigError, match=r"created by replica r1.*copy ca\.crt and ca\.key"
    ):
        await stranger.register_ca("r2")


async def test_lighthouse_slots_are_kept_across_restarts_and_taken_over_when_silent(
    tmp_path: Path, sessions: async_sessionmaker[AsyncSession]
) -> None:
    book = Book(Authority(_settings(tmp_path)), sessions)
    now = time.time()
    one = await book.claim_lighthouse(["203.0.113.1:4242"], "r1", now)
    two = await book.claim_lighthouse(["203.0.113.2:4242"], "r2", now)
    assert (one.slot, one.ip, two.slot, two.ip) == (0, "10.250.0.1", 1, "10.250.0.2")
    # r1 restarts (a new replica id, the same address): the same slot and overlay address.
    assert await book.claim_lighthouse(["203.0.113.1:4242"], "r1-again", now + 5) == one
    # r2 went silent: after the TTL a new replica elsewhere takes its slot, and grants
    # name only the live lighthouses.
    await book.touch_lighthouse(["203.0.113.1:4242"], now + LIGHTHOUSE_TTL_S + 1)
    three = await book.claim_lighthouse(["203.0.113.3:4242"], "r3", now + LIGHTHOUSE_TTL_S + 1)
    assert three.slot == 1
    live = await book.lighthouses(now + LIGHTHOUSE_TTL_S + 2)
    assert [(r.ip, r.addresses) for r in live] == [
        ("10.250.0.1", ["203.0.113.1:4242"]),
        ("10.250.0.2", ["203.0.113.3:4242"]),
    ]
    # Every slot held by a live lighthouse: a clear refusal, not a clash.
    for i in range(2, LIGHTHOUSE_SLOTS):
        await book.claim_lighthouse([f"203.0.113.{10 + i}:4242"], f"r{10 + i}", now + 200)
    with pytest.raises(OverlayConfigError, match="lighthouse slots"):
        await book.claim_lighthouse(["203.0.113.99:4242"], "r99", now + 200)


async def test_the_book_a_coordinator_kept_in_files_is_imported_once(
    tmp_path: Path, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Upgrading a coordinator that kept its book as JSON files loses nothing."""
    authority = Authority(_settings(tmp_path))
    now = time.time()
    (authority.dir / "addresses.json").write_text(
        json.dumps(
            {
                "m-a": {
                    "cluster": "c-1", "ip": "10.250.0.9", "pub": "PUB", "expires": now + 3600,
                    "lifetime": 7200, "certs": [["ab" * 32, now + 3600], ["cd" * 32, now - 1]],
                },
                "broken": "not a dict",
            }
        )
    )  # fmt: skip
    (authority.dir / "blocklist.json").write_text(
        json.dumps(
            {
                "ef" * 32: {
                    "cluster": "c-1",
                    "holder": "m-b",
                    "expires": now + 60,
                    "ip": "10.250.0.10",
                }
            }
        )
    )
    book = await _book(authority, sessions)
    assert await import_files(book, now) == 1
    entry = await book.entry("m-a", now)
    assert entry is not None and (entry.ip, entry.pub, entry.certs) == (
        "10.250.0.9", "PUB", (("ab" * 32, now + 3600),)
    )  # fmt: skip
    assert await book.blocklist("c-1", now) == ["ef" * 32]
    # The revoked holder's address stays out of use; the files are renamed, not re-read.
    pub = _public_key(tmp_path)
    assert (await book.grant("c-1", "m-c", None, pub, now)).overlay_ip == "10.250.0.11"
    assert not (authority.dir / "addresses.json").exists()
    assert (authority.dir / "addresses.imported").exists()
    assert await import_files(book, now) == 0


def test_serve_refuses_a_replica_without_the_networks_ca(tmp_path: Path, db_url: str) -> None:
    """`loom coordinator serve` for a second replica whose overlay directory lacks the
    network's CA (or holds another) exits 2 with one line that says what to copy."""

    async def first_replica() -> None:
        engine = create_engine(db_url)
        await migrate(engine)
        try:
            await Book(Authority(_settings(tmp_path, "r1")), session_factory(engine)).register_ca(
                "r1"
            )
        finally:
            await engine.dispose()

    asyncio.run(first_replica())
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["LOOM_HOME"] = str(tmp_path / "home")
    base = [
        sys.executable, "-m", "loom", "coordinator", "serve", "--db", db_url,
        "--port", str(free_port()), "--overlay-listen", f"127.0.0.1:{free_port()}",
        "--overlay-dir",
    ]  # fmt: skip
    for where, says in (("empty", "has no copy: copy ca.crt and ca.key"), ("other", "but ")):
        if where == "other":
            Authority(_settings(tmp_path, "other"))  # a CA of its own
        done = subprocess.run(
            [*base, str(tmp_path / where)], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert says in done.stderr and "created by replica r1" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


LIGHTHOUSE_HOST = """
import asyncio, sys
from pathlib import Path
from loom.coordinator.overlay.authority import Authority, OverlaySettings
from loom.coordinator.overlay.lighthouse import Lighthouse

async def main():
    settings = OverlaySettings(
        listen=sys.argv[2], advertise="", network="10.250.0.0/24", data_dir=Path(sys.argv[1])
    )
    lighthouse = Lighthouse(Authority(settings))
    await lighthouse.start()
    print(lighthouse.proc.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_lighthouse_dies_with_a_sigkilled_coordinator(tmp_path: Path) -> None:
    """An orphaned lighthouse would hold the UDP port, and the restarted coordinator's own
    lighthouse could not bind it: it gets SIGTERM when its coordinator dies, however."""
    host = subprocess.Popen(
        [sys.executable, "-c", LIGHTHOUSE_HOST, str(tmp_path / "o"), f"127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert host.stdout is not None
    pid = int(host.stdout.readline())
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"nebula")
    host.kill()  # SIGKILL: no clean-up code of the coordinator runs
    host.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    alive = Path(f"/proc/{pid}").exists()
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the lighthouse outlived its coordinator"


async def test_concurrent_lighthouse_reloads_each_take_effect(tmp_path: Path) -> None:
    """The revoking request and the replica's 2 s check may reload at the same moment:
    each rewrite + SIGHUP waits for the other (they once raced on the config's temp file)."""
    lighthouse = Lighthouse(Authority(_settings(tmp_path)))
    await lighthouse.start()
    try:
        lists = [["ab" * 32], ["cd" * 32], ["ef" * 32], []]
        done = await asyncio.gather(*(lighthouse.reload(b) for b in lists))
        assert all(done), lighthouse.log_tail()
        assert json.loads(lighthouse.config_path.read_text())["pki"]["blocklist"] == []
    finally:
        await lighthouse.stop()
