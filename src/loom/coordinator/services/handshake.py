"""The agent handshake: check an `auth` message against the nonce we sent."""

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


def check_auth(auth: Auth, nonce: str, *, default_price_micro: int) -> Registration:
    refuse_old_protocol(auth.protocol)
    for label, key in (("node_key", auth.node_key), ("owner_key", auth.owner_key)):
        try:
            identity.parse_public_key(key)
        except identity.IdentityError as exc:
            raise HandshakeError(CLOSE_AUTH_FAILED, f"{label}: {exc}") from None
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
