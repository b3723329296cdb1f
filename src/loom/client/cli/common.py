"""What every CLI command shares: global options, output, errors and exit codes.

Exit codes: 0 success, 1 the coordinator refused or failed the request, 2 bad input on
the command line, 3 the coordinator could not be reached.

Errors take one path, :func:`fail`: one line on stderr (`error: …`), or, when the command
line has `--json`, one JSON object `{"code", "message", "field"}` on stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from loom.client.config import ClientConfig, ConfigError
from loom.client.sdk import LoomAPIError, LoomClient, LoomConnectionError, LoomError
from loom.protocol.identity import IdentityError

# Piped output (logs, CI, `| less`) gets a wide console instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

F = TypeVar("F", bound=Callable[..., Any])

ERROR_CODES = {EXIT_API: "refused", EXIT_USAGE: "bad_input", EXIT_UNREACHABLE: "unreachable"}
PREFIX = "error: "


class _Output:
    """Process-wide output mode, set once from the command line by `main.run`."""

    json_errors = False


def set_json_errors(on: bool) -> None:
    _Output.json_errors = on


def json_errors() -> bool:
    return _Output.json_errors


@dataclass
class Globals:
    coordinator: str | None = None
    key: str | None = None

    def config(self) -> ClientConfig:
        try:
            return ClientConfig.resolve(self.coordinator, self.key)
        except ConfigError as exc:
            fail(str(exc), field=exc.field)


def globals_from(ctx: typer.Context) -> Globals:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Globals) else Globals()


def report_error(
    message: str, code: int = EXIT_USAGE, *, error_code: str | None = None, field: str | None = None
) -> None:
    """Print an error the one way: a JSON object with `--json`, else `error: …` (one line;
    a multi-line message such as a caret under a query token is indented to stay aligned)."""
    if _Output.json_errors:
        body = {"code": error_code or ERROR_CODES.get(code, "error"), "message": message}
        body["field"] = field  # type: ignore[assignment]
        sys.stderr.write(json.dumps(body) + "\n")
        return
    text = message.replace("\n", "\n" + " " * len(PREFIX))
    err_console.print(f"[bold red]{PREFIX}[/]{escape(text)}", highlight=False, soft_wrap=True)


def fail(
    message: str, code: int = EXIT_USAGE, *, error_code: str | None = None, field: str | None = None
) -> NoReturn:
    report_error(message, code, error_code=error_code, field=field)
    raise typer.Exit(code)


@contextmanager
def client_for(ctx: typer.Context) -> Iterator[LoomClient]:
    """A signed client for the configured coordinator; errors become one-line exits."""
    try:
        config = globals_from(ctx).config()
        config.checked_url()
        client = LoomClient.from_config(config)
    except ConfigError as exc:
        fail(str(exc), field=exc.field)
    except IdentityError as exc:
        fail(str(exc), field="key")
    try:
        yield client
    except LoomConnectionError as exc:
        fail(str(exc), EXIT_UNREACHABLE, error_code="unreachable")
    except LoomAPIError as exc:
        message = exc.message if _Output.json_errors else f"{exc.message} [{exc.code}]"
        fail(message, EXIT_API, error_code=exc.code, field=exc.field)
    except LoomError as exc:
        fail(str(exc), EXIT_API)
    finally:
        client.close()


def print_json(data: Any) -> None:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    elif isinstance(data, list):
        data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    delta = max(0.0, now - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


STATE_STYLE = {
    "available": "green",
    "allocated": "cyan",
    "verifying": "yellow",
    "registering": "yellow",
    "offline": "dim",
    "drained": "dim",
    "removed": "dim",
    "banned": "bold red",
    "running": "green",
    "healing": "yellow",
    "provisioning": "yellow",
    "requested": "yellow",
    "failed": "red",
    "terminated": "dim",
    "terminating": "dim",
    "ready": "green",
    "lost": "red",
}


def styled_state(state: str) -> str:
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/]" if style else state
