"""``drseg info``: what drseg sees in a raster and how many tiles a run would take."""

from __future__ import annotations

from pathlib import Path

import rasterio
import typer
from rich.console import Console
from rich.table import Table

from drseg_cli.commands._common import print_json, report_errors
from drseg_cli.commands.segment import parse_int_list
from drseg_cli.raster.reader import inspect_raster
from drseg_cli.raster.tiling import TileGrid

DEFAULT_TILE = 448


@report_errors
def command(
    path: Path = typer.Argument(..., help="Raster to describe."),
    bands: str | None = typer.Option(None, help="Bands used as R,G,B, e.g. '3,2,1'."),
    tile_size: int = typer.Option(DEFAULT_TILE, help="Tile edge in pixels."),
    overlap: float = typer.Option(0.25, help="Tile overlap fraction."),
    allow_no_crs: bool = typer.Option(False, help="Describe rasters without georeferencing."),
    json_: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Size, bands, dtype, CRS, resolution, nodata and the tile count a run would use."""
    info = inspect_raster(path, parse_int_list(bands, "--bands"), allow_no_crs)
    with rasterio.open(path) as ds:
        interp = [ci.name for ci in ds.colorinterp]
        descriptions = list(ds.descriptions)
    grid = TileGrid.from_fraction(info.width, info.height, tile_size, overlap)
    crs = info.crs
    facts = {
        "path": str(path),
        "size": [info.width, info.height],
        "bands": info.count,
        "color_interp": interp,
        "band_descriptions": descriptions,
        "dtype": info.dtype,
        "crs": crs.to_string() if crs else None,
        "crs_name": crs.to_wkt().split('"')[1] if crs else None,
        "resolution": list(info.res),
        "transform": list(info.transform)[:6],
        "nodata": info.nodata,
        "alpha_band": info.alpha_band,
        "rgb_bands": list(info.bands),
        "tile_size": tile_size,
        "overlap": overlap,
        "tiles": len(grid),
    }
    if json_:
        print_json(facts)
        return
    table = Table(show_header=False, box=None, title=str(path), title_justify="left")
    for key, value in facts.items():
        if key != "path":
            table.add_row(key, str(value))
    Console().print(table)
