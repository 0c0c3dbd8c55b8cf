"""The one error path of the `interplab` command.

A mistake in what the user typed or gave us ends as one line on stderr and exit code 2,
the same in every command. Which exceptions count as the user's mistake:

- `interplab.errors.UserInputError` (and `ArtifactError`): raised on purpose for bad input;
- a plain `ValueError` (or subclass: a JSON or UTF-8 decoding error in the user's file) from
  validation; interplab raises ValueError for a bad value, never for its own bugs;
- `OSError`: a missing file, a folder where a file was expected, no permission, a full disk;
- click's usage errors (unknown option, bad number, missing argument);
- a missing optional third-party package: `ModuleNotFoundError` for a module outside interplab,
  or an `ImportError` whose message tells the user what to install.

Everything else (TypeError, KeyError, AttributeError, RuntimeError, ...) is a bug in interplab
or beneath it, and keeps its traceback so that it can be reported and fixed.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click; older versions use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors

_ABORTS = tuple({typer.Abort, getattr(click_errors, "Abort", typer.Abort)})


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for a user's mistake, or None when `error` is a bug."""
    if isinstance(error, click_errors.ClickException):
        return _click_message(error)
    if isinstance(error, ModuleNotFoundError):
        missing = (error.name or "").split(".")[0]
        return None if missing in ("", "interplab") else str(error)
    if isinstance(error, ImportError):
        return str(error) if "install" in str(error) else None
    if isinstance(error, OSError):
        return _os_message(error)
    if isinstance(error, ValueError):
        return str(error) or type(error).__name__
    return None


def _os_message(error: OSError) -> str:
    what = error.strerror or str(error)
    if error.filename is None:
        return what
    target = f" -> {error.filename2}" if error.filename2 else ""
    return f"{what}: {error.filename}{target}"


def _click_message(error) -> str:
    message = error.format_message()
    ctx = getattr(error, "ctx", None)
    if isinstance(error, click_errors.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


class InterplabGroup(TyperGroup):
    """The top-level group: runs a command and maps user errors to one line and exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as error:
            if not standalone_mode:
                raise
            error.show()
            sys.exit(error.exit_code)
        except _ABORTS:
            if not standalone_mode:
                raise
            typer.echo("aborted", err=True)
            sys.exit(1)
        except Exception as error:  # noqa: BLE001 - bugs are re-raised below with their traceback
            message = user_error_message(error)
            if message is None or not standalone_mode:
                raise
            typer.echo(f"error: {' '.join(message.split())}", err=True)
            sys.exit(2)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result
