"""The ``drseg`` command line: a thin Typer app; each command lives in ``drseg_cli/commands/``."""

from __future__ import annotations

import logging
import os
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
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="drseg: %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.captureWarnings(True)


def _register() -> None:
    from drseg_cli.commands import check, info, models, segment, vectorize

    app.command("segment")(segment.command)
    app.command("vectorize")(vectorize.command)
    app.command("info")(info.command)
    app.command("check")(check.command)
    app.add_typer(models.app, name="models")


def main() -> None:
    _register()
    app()
