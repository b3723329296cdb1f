"""Where the client finds things: coordinator URL, LOOM_HOME, and the signing key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loom.protocol.identity import KeyPair
from loom.protocol.keystore import DEFAULT_KEY_NAME, KeyStore, loom_home

DEFAULT_COORDINATOR = "http://127.0.0.1:8700"


@dataclass(frozen=True)
class ClientConfig:
    coordinator: str
    home: Path
    key_name: str

    @classmethod
    def resolve(cls, coordinator: str | None = None, key: str | None = None) -> ClientConfig:
        """`--coordinator`, else $LOOM_COORDINATOR, else the local default; same for the key."""
        return cls(
            coordinator=(
                coordinator or os.environ.get("LOOM_COORDINATOR") or DEFAULT_COORDINATOR
            ).rstrip("/"),
            home=loom_home(),
            key_name=key or os.environ.get("LOOM_KEY") or DEFAULT_KEY_NAME,
        )

    @property
    def keystore(self) -> KeyStore:
        return KeyStore.for_home(self.home)

    def load_key(self) -> KeyPair:
        """The signing key; the default key is created on first use, a named one must exist."""
        if self.key_name == DEFAULT_KEY_NAME:
            return self.keystore.load_or_create(self.key_name)
        return self.keystore.load(self.key_name)
