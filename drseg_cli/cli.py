"""The ``drseg`` command line: a thin Typer app; each command lives in ``drseg_cli/commands/``."""

from __future__ import annotations

import logging
import os
import signal
import sys

import typer

from drseg_cli import __version__

app = typer.Typer(
    name="drseg",
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
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    if debug:
        os.environ["DRSEG_DEBUG"] = "1"
    handler = logging.StreamHandler(sys.stderr)
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
        segment,
        train,
        tune,
        vectorize,
    )

    app.command("segment")(segment.command)
    app.command("vectorize")(vectorize.command)
    app.command("info")(info.command)
    app.command("check")(check.command)
    app.command("evaluate")(evaluate.command)
    app.command("train")(train.command)
    app.command("tune")(tune.command)
    app.add_typer(models.app, name="models")


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (batch schedulers, ``kill``) stops as cleanly as Ctrl-C does."""
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    _register()
    app()
