"""``drseg check``: verify a produced mask or polygon file against its input scene."""

from __future__ import annotations

from pathlib import Path

import typer

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors
from drseg_cli.errors import UsageError


@report_errors
def command(
    output: Path = typer.Argument(..., help="A drseg mask (.tif) or polygon file."),
    source: Path | None = typer.Option(None, "--input", "-i", help="The scene it came from."),
    mask: Path | None = typer.Option(
        None,
        "--mask",
        help="For polygons: the mask they were made from (default: OUTPUT's .tif, if any).",
    ),
    json_: bool = opt.flag("--json", help="Print JSON on stdout."),
) -> None:
    """Exit 0 if OUTPUT is complete and matches its input and class table; else 1.

    A mask needs its grid and CRS, class names, colour table and .qml style to agree; a
    polygon layer its CRS (or a reprojection of it), its QGIS style in the mask's colours,
    positive areas, class names and polygons on the mask's pixels.
    """
    from drseg_cli.pipeline.segment import MASK_SUFFIXES, VECTOR_SUFFIXES
    from drseg_cli.pipeline.verify import verify_mask, verify_vector

    suffix = output.suffix.lower()
    if suffix in MASK_SUFFIXES:
        if mask is not None:
            raise UsageError("--mask is for checking polygons; OUTPUT is a mask")
        report = verify_mask(output, source, None)
    elif suffix in VECTOR_SUFFIXES:
        if mask is None and output.with_suffix(".tif").is_file():
            mask = output.with_suffix(".tif")
        report = verify_vector(output, source, mask)
        report["against_mask"] = None if mask is None else str(mask)
    else:
        raise UsageError(f"{output}: unknown output type {suffix or '(none)'}")
    report["ok"] = True
    if json_:
        print_json(report)
    else:
        err_console.print(f"{output}: ok", markup=False)
