"""``drseg vectorize``: a class mask (and optionally its scores) → polygons in a vector file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import print_json, report_errors


@report_errors
def command(
    mask: Path = typer.Argument(..., help="drseg class mask (single-band uint8, 255 = nodata)."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Polygon file: .gpkg, .shp, .geojson or .parquet."
    ),
    score: Path | None = typer.Option(
        None,
        help="Score raster on the mask's grid: one float band in [0,1], or one probability "
        "band per class; gives each polygon its mean_score.",
    ),
    min_area: float = typer.Option(
        0.0, help="Drop regions smaller than this ground area in m² (map units² without CRS)."
    ),
    simplify: float = typer.Option(
        0.0, help="Simplification tolerance in map units; neighbours keep shared edges."
    ),
    dst_crs: str | None = typer.Option(
        None,
        help="Write the polygons in this CRS (EPSG:xxxx, WKT, PROJ); default: the mask's, "
        "WGS 84 lon/lat for GeoJSON (RFC 7946). Areas are measured before reprojecting.",
    ),
    overwrite: bool = opt.flag("--overwrite", help="Replace an existing output."),
    quiet: bool = opt.flag("--quiet", "-q", help="Print nothing on success."),
    json_: bool = opt.flag("--json", help="Print a JSON summary on stdout."),
) -> None:
    """One polygon per connected region of one class, with class_id, class_name, area_m2
    (geodesic) and mean_score; written atomically in the mask's CRS (or --dst-crs), styled
    in the mask's class colours for QGIS (inside a .gpkg, else a .qml beside)."""
    # Imported here: geopandas costs a second that `drseg --help` should not pay.
    from drseg_cli.raster.vectorize import open_mask, vector_format, vectorize_mask
    from drseg_cli.raster.vsi import store_path

    vector_format(output)  # an unknown extension fails before anything is read
    mask = store_path(mask)  # s3://… masks are read, and s3://… outputs written, in place
    open_mask(mask).close()  # exists, readable, one uint8 band — or a one-line error
    summary = vectorize_mask(
        mask,
        output,
        score_path=score,
        min_area=min_area,
        simplify=simplify,
        overwrite=overwrite,
        dst_crs=dst_crs,
    )
    if json_:
        print_json(summary.to_dict())
        return
    if quiet:
        return
    per_class = ", ".join(f"{name} {n}" for name, n in summary.class_counts.items())
    dropped = f", {summary.n_dropped} below --min-area dropped" if summary.n_dropped else ""
    Console(highlight=False, soft_wrap=True).print(
        f"{summary.path}: {summary.n_polygons} polygons"
        f"{f' ({per_class})' if per_class else ''}{dropped}, "
        f"CRS {summary.crs or 'none'}, {summary.seconds:.2f} s",
        markup=False,
    )
