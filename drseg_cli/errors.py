"""Errors that reach the user as one clear line (no traceback) with a fixed exit code."""

from __future__ import annotations


class DrsegError(Exception):
    """Base of every error drseg reports to the user; ``str(err)`` is the one-line message."""

    exit_code = 1


class UsageError(DrsegError):
    """Bad arguments: class lists, options, existing outputs without ``--overwrite``."""

    exit_code = 2


class InputError(DrsegError):
    """An input file that cannot be used (missing, unreadable, no CRS, corrupt block...)."""

    exit_code = 1


class OutputError(DrsegError):
    """An output that cannot be written (folder not writable, disk full...)."""

    exit_code = 1


class ModelUnavailableError(DrsegError):
    """Model weights that are neither given, cached nor downloadable."""

    exit_code = 1


def describe_unexpected(exc: BaseException) -> str:
    """One line for an error drseg did not anticipate (the traceback is for ``--debug``)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {first}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): the
    library's own words inside drseg's one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
