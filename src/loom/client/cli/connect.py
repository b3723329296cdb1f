"""`loom cluster connect NAME`: join this machine to a cluster's Nebula overlay.

This machine generates its own Nebula keypair (``nebula-cert keygen``; the private key
stays in a 0700 temporary directory and is deleted on exit), the owner posts only the
public key and gets a user certificate for it (``POST /v1/clusters/{ref}/overlay``,
groups = the cluster, so the members' firewalls admit it), and a local Nebula runs in the
foreground until Ctrl-C. Plain Ray tools then reach the head's overlay address directly:
its GCS, its client port and its Jobs API (``ray job submit --address http://...:8265``).
A tun device needs CAP_NET_ADMIN (root); without it, `loom cluster forward` is the way in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from loom.client.cli.common import EXIT_API, client_for, console, fail, globals_from
from loom.client.sdk import LoomAPIError, LoomClient, LoomError
from loom.protocol.overlay import PUNCH_DELAY, SOCKET_BUFFER, OverlayGrant, OverlayJoin

TUN_DEVICE = "loom-user"
#: How often `connect` looks at the clock while Nebula runs (renewal due?).
POLL_S = 5.0


def user_config(grant: OverlayGrant, directory: Path) -> dict[str, object]:
    """The local Nebula's config: a client of the cluster's overlay, nothing admitted in."""
    return {
        "pki": {
            "ca": str(directory / "ca.crt"),
            "cert": str(directory / "user.crt"),
            "key": str(directory / "user.key"),
        },
        "static_host_map": grant.lighthouses(),
        "lighthouse": {"am_lighthouse": False, "interval": 30, "hosts": list(grant.lighthouses())},
        "listen": {
            "host": "0.0.0.0",
            "port": 0,
            "read_buffer": SOCKET_BUFFER,
            "write_buffer": SOCKET_BUFFER,
        },
        # Punch back in time for a direct tunnel to the head (the members' setting).
        "punchy": {"punch": True, "respond": True, "delay": PUNCH_DELAY},
        "relay": {"relays": list(grant.lighthouses()), "use_relays": True},
        "tun": {"dev": TUN_DEVICE, "mtu": 1300},
        "logging": {"level": "warning"},
        "firewall": {
            "outbound": [{"port": "any", "proto": "any", "host": "any"}],
            "inbound": [{"port": "any", "proto": "icmp", "host": "any"}],
        },
    }


def connect(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="cluster name or id")],
) -> None:
    """Join this machine to the cluster's overlay (needs root), until Ctrl-C."""
    nebula = shutil.which("nebula")
    if nebula is None:
        fail("`loom cluster connect` needs Nebula (apt-get install nebula); or use forward")
    if os.geteuid() != 0:
        fail(
            "joining the overlay creates a tun device, which needs CAP_NET_ADMIN: run it as "
            "root (sudo -E loom cluster connect …), or use `loom cluster forward` instead"
        )
    with tempfile.TemporaryDirectory(prefix="loom-connect-") as tmp:
        d = Path(tmp)  # 0700: mkdtemp
        public_key = _keygen(d)
        with client_for(ctx) as loom:
            cluster = loom.cluster(name)
            try:
                raw = loom.request(
                    "POST",
                    f"/v1/clusters/{cluster.id}/overlay",
                    json=OverlayJoin(public_key=public_key).model_dump(),
                ).json()
            except LoomAPIError as exc:
                fail(f"{exc.message} [{exc.code}]", EXIT_API)
        grant = OverlayGrant.model_validate(raw)
        (d / "ca.crt").write_text(grant.ca_crt)
        (d / "user.crt").write_text(grant.crt)
        (d / "config.yml").write_text(json.dumps(user_config(grant, d)))
        signal.signal(signal.SIGTERM, _interrupt)  # leave cleanly on SIGTERM too
        proc = subprocess.Popen([nebula, "-config", str(d / "config.yml")])
        try:
            time.sleep(0.5)
            if proc.poll() is not None:
                fail(f"nebula exited at once (code {proc.returncode}); see its output above")
            head = cluster.head_address.rsplit(":", 1)[0]
            jobs = _jobs_url(cluster.dashboard_url, head)
            hours = max(0.0, (grant.expires_at - time.time()) / 3600)
            console.print(
                f"on the overlay of [bold]{cluster.name}[/] as {grant.overlay_ip}: "
                f"Ray GCS at [bold]{cluster.head_address}[/] (head {head})\n"
                + (f"Jobs API: ray job submit --address {jobs} -- python ...\n" if jobs else "")
                + f"this certificate is valid for {hours:.1f} h and renewed while connect runs\n"
                f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(loom cluster token {cluster.name})\n"
                "press Ctrl-C to leave"
            )
            cert_name = _cert_name(d / "user.crt") or ""

            def renew() -> OverlayGrant:
                with client_for(ctx) as loom:
                    got = loom.request(
                        "POST",
                        f"/v1/clusters/{cluster.id}/overlay/{cert_name}/renew",
                        json=OverlayJoin(public_key=public_key).model_dump(),
                    ).json()
                return OverlayGrant.model_validate(got)

            stay(proc, grant, d / "user.crt", renew)
        except KeyboardInterrupt:
            pass
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
            _revoke(ctx, cluster.id, d / "user.crt")


def stay(
    proc: subprocess.Popen[bytes],
    grant: OverlayGrant,
    crt: Path,
    renew: Callable[[], OverlayGrant],
    clock: Callable[[], float] = time.time,
    say: Callable[[str], None] = console.print,
) -> int:
    """Until the local Nebula exits: renew its certificate once a third of its lifetime is
    left, write it atomically and SIGHUP Nebula (it reloads its PKI and keeps its tunnels).
    A failed renewal is said and retried (every 30 s at most, sooner near the expiry).
    The clock is read every few seconds (a machine waking from sleep renews at once).
    Returns how many renewals were taken."""
    expires, lifetime = grant.expires_at, max(1.0, grant.expires_at - clock())
    taken = 0
    due = expires - lifetime / 3
    while True:
        try:
            proc.wait(min(POLL_S, max(0.2, due - clock())))
            return taken
        except subprocess.TimeoutExpired:
            pass
        try:
            fresh = renew()
        except (LoomError, OSError, ValueError) as exc:
            left = expires - clock()
            say(f"[yellow]renewing the certificate failed ({exc}); {max(0, left):.0f} s left[/]")
            due = clock() + max(1.0, min(30.0, left / 4))
            continue
        tmp = crt.with_suffix(".new")
        tmp.write_text(fresh.crt)
        tmp.replace(crt)
        proc.send_signal(signal.SIGHUP)
        taken += 1
        expires, lifetime = fresh.expires_at, max(1.0, fresh.expires_at - clock())
        due = expires - lifetime / 3
        say(f"certificate renewed: valid for {lifetime / 3600:.1f} h")


def _revoke(ctx: typer.Context, cluster_id: str, crt: Path) -> None:
    """Leaving: the coordinator revokes this machine's certificate at once (its fingerprint
    joins the cluster's blocklist), instead of leaving it valid until it expires. Best
    effort: the private key is deleted with the temporary directory either way."""
    name = _cert_name(crt)
    if name is None:
        return
    try:  # not client_for: a failure here is a warning, not the command's exit status
        with LoomClient.from_config(globals_from(ctx).config()) as loom:
            loom.request("DELETE", f"/v1/clusters/{cluster_id}/overlay/{name}")
    except (LoomError, OSError) as exc:
        console.print(
            f"[yellow]could not revoke the certificate {name} now ({exc}); it expires on its own[/]"
        )
    else:
        console.print(f"left the overlay; certificate {name} revoked")


def _cert_name(crt: Path) -> str | None:
    done = subprocess.run(
        ["nebula-cert", "print", "-json", "-path", str(crt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:
        name = json.loads(done.stdout)["details"]["name"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


def _keygen(d: Path) -> str:
    """This machine's own Nebula keypair in ``d``; returns the public key PEM."""
    done = subprocess.run(
        ["nebula-cert", "keygen", "-out-key", str(d / "user.key"), "-out-pub", str(d / "user.pub")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        fail(f"nebula-cert keygen failed: {done.stderr.strip()}")
    os.chmod(d / "user.key", 0o600)
    return (d / "user.pub").read_text()


def _jobs_url(dashboard_url: str, head: str) -> str:
    """The head's Jobs API on its overlay address (its dashboard binds it), or ""."""
    port = dashboard_url.rstrip("/").rpartition(":")[2]
    return f"http://{head}:{port}" if port.isdigit() and head else ""


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt
