"""Run the `loom` command tree with one error path: no traceback ever reaches a user.

Click's usage errors (unknown option, bad value, missing argument, flag conflicts) become
one `error: …` line (or a JSON object with `--json`) and exit 2; a command's own failures
already went through `common.fail`; anything unexpected is one line and exit 1
(`LOOM_DEBUG=1` shows the traceback instead).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

import typer
import typer.core
import typer.main
from typer import _click as click  # typer vendors click: its exceptions are these
from typer._click import exceptions as click_errors

from loom.client.cli.common import EXIT_API, EXIT_USAGE, report_error, set_json_errors

EXIT_INTERRUPTED = 130


def _plain_help(command: click.Command) -> None:
    """Click's plain help on every screen: rich markup would eat `[eu-west,us-east]`."""
    if isinstance(command, typer.core.TyperCommand | typer.core.TyperGroup):
        command.rich_markup_mode = None
    if isinstance(command, typer.core.TyperGroup):
        for sub in command.commands.values():
            _plain_help(sub)


def _wants_json(args: Sequence[str]) -> bool:
    """`--json` among the options (not in an entrypoint after `--`)."""
    head = list(args[: list(args).index("--")]) if "--" in args else list(args)
    return "--json" in head


def _usage_error(exc: click_errors.UsageError) -> tuple[str, str | None]:
    message = exc.format_message()
    field: str | None = None
    if isinstance(exc, click_errors.BadParameter) and exc.param is not None:
        field = exc.param.name
    elif isinstance(exc, click_errors.NoSuchOption):
        field = exc.option_name.lstrip("-")
    path = exc.ctx.command_path if exc.ctx is not None else "loom"
    return f"{message} (see `{path} --help`)", field


def run(app: typer.Typer, argv: Sequence[str] | None = None) -> int:
    """Run `app` on `argv` (default: sys.argv[1:]); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    set_json_errors(_wants_json(args))
    command = typer.main.get_command(app)
    _plain_help(command)
    try:
        result = command.main(args=args, prog_name="loom", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            click.echo(exc.ctx.get_help())
        return EXIT_USAGE
    except click_errors.UsageError as exc:
        message, field = _usage_error(exc)
        report_error(message, EXIT_USAGE, error_code="usage", field=field)
        return EXIT_USAGE
    except click_errors.ClickException as exc:
        report_error(exc.format_message(), exc.exit_code or EXIT_API)
        return exc.exit_code or EXIT_API
    except typer.Abort:
        report_error("aborted", EXIT_INTERRUPTED, error_code="aborted")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # typer's completion callbacks exit directly
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_API)
    except BrokenPipeError:
        return EXIT_API
    except Exception as exc:  # the last resort: one line, never a traceback
        if os.environ.get("LOOM_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            return EXIT_API
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        report_error(
            f"internal error: {type(exc).__name__}{': ' + text if text else ''} "
            "(LOOM_DEBUG=1 shows the traceback)",
            EXIT_API,
            error_code="internal",
        )
        return EXIT_API
    return result if isinstance(result, int) else 0
