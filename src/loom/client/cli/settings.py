"""`loom config show|set|unset`: defaults kept in `$LOOM_HOME/config.toml`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from loom.client.cli.common import console, fail, print_json
from loom.client.config import (
    CONFIG_KEYS,
    DEFAULT_COORDINATOR,
    ConfigError,
    check_coordinator_url,
    config_path,
    read_config_file,
    write_config_file,
)
from loom.core.models import validate_region
from loom.protocol.identity import IdentityError
from loom.protocol.keystore import DEFAULT_KEY_NAME, validate_key_name

app = typer.Typer(
    help="Defaults for every command (coordinator URL, key, region, runtime).",
    no_args_is_help=True,
)

RUNTIMES = ("bwrap", "docker", "process")
BUILTIN = {"coordinator": DEFAULT_COORDINATOR, "key": DEFAULT_KEY_NAME}


def _stored() -> dict[str, str]:
    try:
        return read_config_file()
    except ConfigError as exc:
        fail(str(exc), field=exc.field)


def _check(key: str, value: str) -> str:
    value = value.strip()
    try:
        if key == "coordinator":
            return check_coordinator_url(value, "loom config set")
        if key == "region":
            return validate_region(value)
        if key == "runtime" and value not in RUNTIMES:
            raise ValueError(f"unknown runtime {value!r}; choose one of: {', '.join(RUNTIMES)}")
        if key == "key":
            return validate_key_name(value)
    except (ValueError, IdentityError) as exc:
        fail(str(exc), field=key)
    return value


@app.command("show")
def show(json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Each setting, its effective value and where that value comes from."""
    stored = _stored()
    rows: list[dict[str, str | None]] = []
    for key, (meaning, env_var) in CONFIG_KEYS.items():
        value: str | None
        env_value = os.environ.get(env_var) if env_var else None
        if env_value:
            value, source = env_value, f"${env_var}"
        elif key in stored:
            value, source = stored[key], "config file"
        else:
            value, source = BUILTIN.get(key), "default"
        rows.append({"key": key, "value": value, "source": source, "meaning": meaning})
    if json_out:
        print_json({"path": str(config_path()), "settings": rows})
        return
    console.print(f"config file: {config_path()}", highlight=False)
    for row in rows:
        shown = row["value"] if row["value"] is not None else "-"
        console.print(
            f"  {row['key']!s:<12} {shown:<28} ({row['source']}) {row['meaning']}",
            highlight=False,
        )


@app.command("set")
def set_value(
    key: Annotated[str, typer.Argument(help="coordinator, key, region or runtime")],
    value: Annotated[str, typer.Argument(help="the new value")],
) -> None:
    """Store a default in $LOOM_HOME/config.toml (flags and environment still win)."""
    if key not in CONFIG_KEYS:
        fail(f"unknown setting {key!r}; choose one of: {', '.join(CONFIG_KEYS)}", field="key")
    stored = _stored()
    stored[key] = _check(key, value)
    path = write_config_file(stored)
    console.print(f"{key} = {stored[key]}  (saved to {path})", highlight=False)


@app.command("unset")
def unset(key: Annotated[str, typer.Argument(help="the setting to remove")]) -> None:
    """Remove a stored default."""
    if key not in CONFIG_KEYS:
        fail(f"unknown setting {key!r}; choose one of: {', '.join(CONFIG_KEYS)}", field="key")
    stored = _stored()
    stored.pop(key, None)
    write_config_file(stored)
    console.print(f"{key} unset", highlight=False)
