"""Protocol versions. The agent sends its version at handshake; too old is refused."""

from __future__ import annotations

#: The agent protocol this code speaks.
PROTOCOL_VERSION = 1
#: The oldest agent protocol a coordinator still accepts.
MIN_AGENT_PROTOCOL = 1
#: Version of the HTTP API (routes live under /v1).
API_VERSION = "v1"
