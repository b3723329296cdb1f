"""Where the client finds things: coordinator URL, LOOM_HOME, the signing key, defaults.

Each setting comes from the command-line flag, else its environment variable, else
`$LOOM_HOME/config.toml` (written by `loom config set`), else the built-in default.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx

from loom.protocol.identity import KeyPair
from loom.protocol.keystore import DEFAULT_KEY_NAME, KeyStore, loom_home

DEFAULT_COORDINATOR = "http://127.0.0.1:8700"
CONFIG_FILE = "config.toml"

# Settings `loom config set` accepts, with what each is for and its environment variable.
CONFIG_KEYS: dict[str, tuple[str, str | None]] = {
    "coordinator": ("coordinator URL for every command", "LOOM_COORDINATOR"),
    "key": ("key name to sign with", "LOOM_KEY"),
    "region": ("default region for `worker start` and `cluster up`", None),
    "runtime": ("default sandbox runtime for `worker start`", None),
}


class ConfigError(ValueError):
    """Bad configuration (a malformed URL, an unreadable config file): exit 2."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def config_path(home: Path | None = None) -> Path:
    return (home or loom_home()) / CONFIG_FILE


def read_config_file(home: Path | None = None) -> dict[str, str]:
    """The settings in `$LOOM_HOME/config.toml` ({} when there is none)."""
    path = config_path(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", "config") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}; fix it or remove it", "config") from None
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in CONFIG_KEYS or not isinstance(value, str):
            raise ConfigError(
                f"{path}: unknown setting {key!r} (known: {', '.join(CONFIG_KEYS)})", key
            )
        out[key] = value
    return out


def write_config_file(values: dict[str, str], home: Path | None = None) -> Path:
    """Write the settings as TOML (flat string keys; JSON string escapes are valid TOML)."""
    path = config_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{key} = {json.dumps(values[key])}" for key in CONFIG_KEYS if key in values]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return path


def check_coordinator_url(url: str, source: str = "--coordinator") -> str:
    """`url` without a trailing slash, or ConfigError saying what a valid one looks like."""
    text = url.strip().rstrip("/")
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        example = f"http://{text}" if text and "://" not in text else DEFAULT_COORDINATOR
        raise ConfigError(
            f"coordinator URL {url!r} (from {source}) is not an http(s) URL; "
            f"give it with its scheme, e.g. {example}",
            "coordinator",
        )
    return text


@dataclass(frozen=True)
class ClientConfig:
    coordinator: str
    home: Path
    key_name: str
    region: str | None = None
    runtime: str | None = None
    coordinator_source: str = "--coordinator"

    @classmethod
    def resolve(cls, coordinator: str | None = None, key: str | None = None) -> ClientConfig:
        """`--coordinator`, else $LOOM_COORDINATOR, else config.toml, else the local default;
        the same for the key. Raises ConfigError for an unreadable config file."""
        home = loom_home()
        stored = read_config_file(home)
        url, source = DEFAULT_COORDINATOR, "the default"
        for value, where in (
            (coordinator, "--coordinator"),
            (os.environ.get("LOOM_COORDINATOR"), "$LOOM_COORDINATOR"),
            (stored.get("coordinator"), str(config_path(home))),
        ):
            if value:
                url, source = value, where
                break
        return cls(
            coordinator=url.rstrip("/"),
            home=home,
            key_name=key or os.environ.get("LOOM_KEY") or stored.get("key") or DEFAULT_KEY_NAME,
            region=stored.get("region"),
            runtime=stored.get("runtime"),
            coordinator_source=source,
        )

    def checked_url(self) -> str:
        return check_coordinator_url(self.coordinator, self.coordinator_source)

    @property
    def keystore(self) -> KeyStore:
        return KeyStore.for_home(self.home)

    def load_key(self) -> KeyPair:
        """The signing key; the default key is created on first use, a named one must exist."""
        if self.key_name == DEFAULT_KEY_NAME:
            return self.keystore.load_or_create(self.key_name)
        return self.keystore.load(self.key_name)
