"""The ``drseg`` command line: a thin Typer app; each command lives in ``drseg_cli/commands/``."""

from __future__ import annotations

import logging
import os
import signal
import sys

import typer
from typer.core import TyperGroup

from drseg_cli import __version__
from drseg_cli.commands.options import DrsegCommand, HelpFlag

#: click's UsageError (typer ≥ 0.24 vendors click, so it is found through a public subclass).
_CLICK_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _usage_exit(exc: Exception) -> None:
    """click's usage errors (unknown option, missing argument, bad value) as one line,
    ``drseg: error: ...``, exit 2; no-arguments help passes through."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        raise exc
    from drseg_cli.commands._common import err_console

    ctx = getattr(exc, "ctx", None)
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    where = " ".join(["drseg", *reversed(names)])
    message = " ".join(exc.format_message().split()).rstrip(".")  # may span lines
    err_console.print(f"drseg: error: {message} (see {where} --help)", markup=False)
    raise typer.Exit(2)


class DrsegGroup(HelpFlag, TyperGroup):
    """The root group: usage errors anywhere below it become one ``drseg: error:`` line."""

    def make_context(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        try:
            return super().make_context(*args, **kwargs)
        except _CLICK_USAGE_ERROR as exc:
            _usage_exit(exc)

    def invoke(self, ctx):  # noqa: ANN001, ANN201
        try:
            return super().invoke(ctx)
        except _CLICK_USAGE_ERROR as exc:
            _usage_exit(exc)


app = typer.Typer(
    name="drseg",
    cls=DrsegGroup,
    help="Open-vocabulary semantic segmentation of GeoTIFFs (DR-Seg: CLIP + DINO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LowerLevelFormatter(logging.Formatter):
    """``drseg: warning: ...``, matching the ``drseg: error: ...`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


class ConsoleLogHandler(logging.Handler):
    """Log records printed through the console the progress bar draws on, so a warning lands
    above the live bar instead of being written into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from drseg_cli.commands import _common  # the console, looked up now: tests swap it

        try:
            _common.err_console.print(self.format(record), markup=False, highlight=False)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _quiet_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """Errors in finalizers (e.g. rasterio decoding a corrupt tag on close) are not the
    user's business unless ``--debug``; the real error has already been reported."""
    logging.getLogger("drseg").debug("ignored: %r", unraisable.exc_value)


def _one_line_excepthook(exc_type, exc, tb) -> None:
    """C extensions print errors raised in their callbacks (rasterio's GDAL error handler)
    through this hook; that is noise, since commands report their errors themselves."""
    logging.getLogger("drseg").debug("ignored: %r", exc)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"drseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print the version.",
        metavar="",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.", metavar=""),
) -> None:
    if debug:
        os.environ["DRSEG_DEBUG"] = "1"
    handler = ConsoleLogHandler()
    handler.setFormatter(_LowerLevelFormatter("drseg: %(levelname)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, handlers=[handler], force=True
    )
    logging.captureWarnings(True)
    if not debug:  # GDAL's own chatter (CPLE_* warnings); our errors say what matters
        logging.getLogger("rasterio").setLevel(logging.ERROR)
        sys.unraisablehook = _quiet_unraisable
        sys.excepthook = _one_line_excepthook


def _register() -> None:
    from drseg_cli.commands import (
        check,
        evaluate,
        info,
        models,
        refer,
        segment,
        train,
        tune,
        vectorize,
    )

    for name, module in (
        ("segment", segment),
        ("refer", refer),
        ("vectorize", vectorize),
        ("info", info),
        ("check", check),
        ("evaluate", evaluate),
        ("train", train),
        ("tune", tune),
    ):
        app.command(name, cls=DrsegCommand)(module.command)
    app.add_typer(models.app, name="models")


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (batch schedulers, ``kill``) stops as cleanly as Ctrl-C does."""
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    _register()
    app()
