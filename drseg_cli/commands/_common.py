"""Shared CLI plumbing: one-line errors with fixed exit codes, console, JSON output."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from drseg_cli.errors import DrsegError, describe_unexpected

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def debug_enabled() -> bool:
    return os.environ.get("DRSEG_DEBUG", "") not in ("", "0")


def report_errors(fn: F) -> F:
    """Turn a DrsegError into ``drseg: error: ...`` on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DrsegError as exc:
            if debug_enabled():
                raise
            err_console.print(f"drseg: error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("drseg: interrupted", markup=False)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the user gets one line, --debug the rest
            if debug_enabled():
                raise
            err_console.print(
                f"drseg: error: {describe_unexpected(exc)} (rerun with --debug for details)",
                markup=False,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_json(payload: dict[str, Any] | list[Any]) -> None:
    """Machine-readable summary on stdout, one JSON document."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()
