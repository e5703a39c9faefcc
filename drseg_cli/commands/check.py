"""``drseg check``: verify a produced mask or polygon file against its input scene."""

from __future__ import annotations

from pathlib import Path

import typer

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors
from drseg_cli.errors import DrsegError, UsageError


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
    from drseg_cli.atomic import as_objects, fetched, is_file
    from drseg_cli.pipeline.segment import (
        MASK_SUFFIXES,
        VECTOR_SUFFIXES,
        OutputPlan,
        plan_files,
    )
    from drseg_cli.pipeline.verify import verify_mask, verify_vector
    from drseg_cli.raster import vsi

    for option, given in (("--input", source), ("--mask", mask)):
        if given is not None and str(given).startswith(("http:/", "https:/", "/vsicurl")):
            raise UsageError(f"{option} {given}: check reads local files or s3://, gs://, az://")
    # s3://b/k → /vsis3/b/k: outputs on an object store are checked on local copies
    output, source, mask = (
        None if p is None else vsi.output_path(p) for p in (output, source, mask)
    )
    suffix = output.suffix.lower()
    if suffix in MASK_SUFFIXES:
        if mask is not None:
            raise UsageError("--mask is for checking polygons; OUTPUT is a mask")
        plan = OutputPlan(output)
    elif suffix in VECTOR_SUFFIXES:
        beside = output.with_suffix(".tif")
        if mask is None and is_file(beside):
            mask = beside
        plan = OutputPlan(mask, output)
    else:
        raise UsageError(f"{output}: unknown output type {suffix or '(none)'}")
    finals = plan_files(plan)
    with fetched(finals) as copies:
        local = dict(zip(finals, copies, strict=True))
        try:
            if plan.vector is None:
                report = verify_mask(local[output], source, None)
            else:
                report = verify_vector(local[output], source, local[mask] if mask else None)
                report["against_mask"] = None if mask is None else str(mask)
        except DrsegError as exc:  # name the store's objects, not the local copies
            raise type(exc)(as_objects(str(exc), local)) from None
        report = {k: as_objects(v, local) if isinstance(v, str) else v for k, v in report.items()}
    report["ok"] = True
    if json_:
        print_json(report)
    else:
        err_console.print(f"{output}: ok", markup=False)
