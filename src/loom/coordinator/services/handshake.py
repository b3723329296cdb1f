"""The agent handshake: check an `auth` message against the nonce we sent.

Keys must be in their one spelling (64 lower-case hex digits: an owner key spelled in upper
case would otherwise be a second account for one keypair, and one that the ledger cannot
pay). The inventory is a *claim*: it is checked against physical bounds here (a claim out
of them closes the socket with a reason naming the field), and it changes no public figure
until the hardware challenge verifies it (devices start `claimed`).
"""

from __future__ import annotations

from loom.coordinator.services.nodes import Registration
from loom.core.models import validate_country, validate_region
from loom.core.money import AmountError, parse_credits
from loom.protocol import identity
from loom.protocol.messages import (
    CLOSE_AUTH_FAILED,
    CLOSE_BAD_MESSAGE,
    CLOSE_PROTOCOL_TOO_OLD,
    Auth,
    Inventory,
)
from loom.protocol.version import MIN_AGENT_PROTOCOL, PROTOCOL_VERSION


class HandshakeError(Exception):
    """Refuse the agent: close the WebSocket with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]  # a close reason must fit in a control frame


def refuse_old_protocol(protocol: int) -> None:
    if protocol < MIN_AGENT_PROTOCOL:
        raise HandshakeError(
            CLOSE_PROTOCOL_TOO_OLD,
            f"agent protocol {protocol} is too old; this coordinator needs "
            f"{MIN_AGENT_PROTOCOL}..{PROTOCOL_VERSION}: upgrade loom",
        )


#: Physical bounds of one machine's claim (beyond any machine sold today, by a margin).
MAX_CPU_CORES = 1024
MAX_RAM_MB = 64 * 1024 * 1024  # 64 TiB
MAX_DISK_MB = 1024 * 1024 * 1024  # 1 PiB
MAX_GPUS = 64
MAX_VRAM_MB = 1024 * 1024  # 1 TiB per device
MAX_TEXT = 256
MAX_RUNTIMES = 16


def _bounded(what: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise HandshakeError(
            CLOSE_BAD_MESSAGE, f"inventory: {what} {value} is outside {low}..{high}"
        )


def check_inventory(inv: Inventory) -> None:
    """Refuse a claim no machine can have; raises HandshakeError (close 4003) naming it."""
    _bounded("cpu_cores", inv.cpu_cores, 1, MAX_CPU_CORES)
    _bounded("ram_mb", inv.ram_mb, 1, MAX_RAM_MB)
    _bounded("disk_free_mb", inv.disk_free_mb, 0, MAX_DISK_MB)
    _bounded("number of gpus", len(inv.gpus), 0, MAX_GPUS)
    _bounded("number of runtimes", len(inv.runtimes), 0, MAX_RUNTIMES)
    texts = {
        "cpu_model": inv.cpu_model,
        "hostname": inv.hostname,
        "os": inv.os,
        "ray_version": inv.ray_version,
        **{f"runtimes[{i}]": r for i, r in enumerate(inv.runtimes)},
    }
    seen: set[int] = set()
    for gpu in inv.gpus:
        _bounded("gpu index", gpu.index, 0, MAX_GPUS - 1)
        if gpu.index in seen:
            raise HandshakeError(CLOSE_BAD_MESSAGE, f"inventory: gpu index {gpu.index} repeated")
        seen.add(gpu.index)
        _bounded(f"gpus[{gpu.index}].vram_mb", gpu.vram_mb, 0, MAX_VRAM_MB)
        for name in ("model", "name", "uuid", "driver", "compute_capability"):
            texts[f"gpus[{gpu.index}].{name}"] = getattr(gpu, name)
    for what, text in texts.items():
        if len(text) > MAX_TEXT:
            raise HandshakeError(
                CLOSE_BAD_MESSAGE, f"inventory: {what} is longer than {MAX_TEXT} characters"
            )


def check_auth(auth: Auth, nonce: str, *, default_price_micro: int) -> Registration:
    refuse_old_protocol(auth.protocol)
    for label, key in (("node_key", auth.node_key), ("owner_key", auth.owner_key)):
        try:
            identity.parse_public_key(key)
        except identity.IdentityError as exc:
            raise HandshakeError(CLOSE_AUTH_FAILED, f"{label}: {exc}") from None
    check_inventory(auth.inventory)
    if not identity.verify_signature(
        auth.node_key, identity.agent_auth_message(nonce), auth.nonce_sig
    ):
        raise HandshakeError(CLOSE_AUTH_FAILED, "nonce signature does not verify with node_key")
    if not identity.verify_signature(
        auth.owner_key, identity.binding_message(auth.node_key), auth.binding_sig
    ):
        raise HandshakeError(CLOSE_AUTH_FAILED, "owner binding of node_key does not verify")
    try:
        region = validate_region(auth.region)
        country = validate_country(auth.country) if auth.country else ""
    except ValueError as exc:
        raise HandshakeError(CLOSE_BAD_MESSAGE, str(exc)) from None
    name = auth.name.strip()[:128] or identity.node_id_for(auth.node_key)
    if len(auth.price) > 64:
        raise HandshakeError(CLOSE_BAD_MESSAGE, "price: longer than 64 characters")
    price_auto = auth.price.strip().lower() == "auto"
    if price_auto:
        price_micro = default_price_micro
    else:
        try:
            price_micro = parse_credits(auth.price)
        except AmountError as exc:
            raise HandshakeError(CLOSE_BAD_MESSAGE, f"price: {exc}") from None
    return Registration(
        node_id=identity.node_id_for(auth.node_key),
        node_key=auth.node_key,
        owner_key=auth.owner_key,
        name=name,
        region=region,
        country=country,
        price_micro=price_micro,
        price_auto=price_auto,
        protocol=auth.protocol,
        agent_version=auth.agent_version[:32],
        inventory=auth.inventory,
    )
