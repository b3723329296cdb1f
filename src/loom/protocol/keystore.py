"""Keys on disk, under `$LOOM_HOME/keys/<name>.key` (private, mode 0600).

Shared by the CLI (owner keys) and the agent (node keys). A key file holds the 32-byte
Ed25519 seed as hex; the public key is derived from it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loom.protocol.identity import IdentityError, KeyPair

DEFAULT_KEY_NAME = "default"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def loom_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`explicit`, else `$LOOM_HOME`, else `~/.loom`."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("LOOM_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".loom"


def validate_key_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise IdentityError(
            f"invalid key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)"
        )
    return name


class KeyStore:
    """A folder of named private keys."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def for_home(cls, home: Path) -> KeyStore:
        return cls(home / "keys")

    def path(self, name: str) -> Path:
        return self.directory / f"{validate_key_name(name)}.key"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def create(self, name: str, *, overwrite: bool = False) -> KeyPair:
        path = self.path(name)
        if path.exists() and not overwrite:
            raise IdentityError(f"key {name!r} already exists at {path}; pick another --name")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = KeyPair.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.seed_hex() + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return key

    def load(self, name: str) -> KeyPair:
        path = self.path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise IdentityError(
                f"no key named {name!r} (looked for {path}); run `loom key new`"
            ) from None
        return KeyPair.from_seed_hex(text)

    def load_or_create(self, name: str) -> KeyPair:
        if self.exists(name):
            return self.load(name)
        return self.create(name)

    def names(self) -> list[str]:
        if not self.directory.exists():
            return []
        return sorted(p.stem for p in self.directory.glob("*.key"))
