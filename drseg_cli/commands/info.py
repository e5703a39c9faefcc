"""``drseg info``: what drseg sees in rasters and how many tiles a run would take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import print_json, report_errors
from drseg_cli.commands.segment import parse_int_list
from drseg_cli.errors import UsageError
from drseg_cli.model.factory import DEFAULT_PRESET, METHODS, default_tiling
from drseg_cli.raster.reader import inspect_raster, open_raster
from drseg_cli.raster.remote import RasterSource, as_input
from drseg_cli.raster.stac import is_stac_candidate, stac_input
from drseg_cli.raster.tiling import TileGrid


def describe(
    path: Path | RasterSource,
    bands: list[int] | None,
    tile_size: int,
    overlap: float,
    aoi: str | None = None,
    aoi_crs: str | None = None,
) -> dict[str, Any]:
    """The facts ``info`` prints for one raster; rasters without georeferencing are
    described too (``georeferenced: false``), since ``segment --allow-no-crs`` takes them.
    With ``aoi``, also the tiles ``segment --aoi`` would run (``aoi_tiles``)."""
    info = inspect_raster(path, bands, allow_no_crs=True)
    with open_raster(info.path) as ds:
        interp = [ci.name for ci in ds.colorinterp]
        descriptions = list(ds.descriptions)
    grid = TileGrid.from_fraction(info.width, info.height, tile_size, overlap)
    crs = info.crs
    extra: dict[str, Any] = {}
    if aoi is not None:
        from drseg_cli.raster.aoi import count_tiles, scene_aoi

        area = scene_aoi(aoi, info, aoi_crs)
        extra = {"aoi": aoi, "aoi_tiles": count_tiles(area, grid)}
    return {
        "path": str(path),
        "size": [info.width, info.height],
        "bands": info.count,
        "color_interp": interp,
        "band_descriptions": descriptions,
        "dtype": info.dtype,
        "georeferenced": crs is not None and not info.transform.is_identity,
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
    } | extra


@report_errors
def command(
    paths: list[str] = typer.Argument(..., help="Rasters to describe (files, URLs, STAC Items)."),
    bands: str | None = typer.Option(None, help="Bands used as R,G,B, e.g. '3,2,1'."),
    model: str = typer.Option(
        DEFAULT_PRESET, "--model", "-m", help="Model preset whose tile size counts tiles."
    ),
    method: str = typer.Option("drseg", "--method", help=" | ".join(METHODS) + "."),
    tile_size: int | None = typer.Option(None, help="Tile edge in pixels (model default)."),
    overlap: float | None = typer.Option(None, help="Tile overlap fraction (model default)."),
    aoi: str | None = opt.aoi(panel=None),
    aoi_crs: str | None = opt.aoi_crs(panel=None),
    allow_no_crs: bool = typer.Option(
        False, hidden=True, help="Accepted for compatibility: rasters without CRS are described."
    ),
    json_: bool = opt.flag(
        "--json", help="Print JSON on stdout (an object; a list for several rasters)."
    ),
) -> None:
    """Size, bands, dtype, CRS, resolution, nodata and the tile count a run would use.

    Tiles are counted with the tile size and overlap ``segment --model M --method X`` uses;
    with ``--aoi``, also those an area of interest lets run (``aoi_tiles``).
    """
    size, default_overlap = default_tiling(model, method)
    size = tile_size if tile_size is not None else size
    overlap = default_overlap if overlap is None else overlap
    if size <= 0:
        raise UsageError(f"--tile-size {size}: must be positive")
    if not 0 <= overlap < 0.9:
        raise UsageError("--overlap: must be in [0, 0.9)")
    band_list = parse_int_list(bands, "--bands")
    sources = [stac_input(p) if is_stac_candidate(p) else as_input(p) for p in paths]
    described = [describe(source, band_list, size, overlap, aoi, aoi_crs) for source in sources]
    if json_:
        print_json(described[0] if len(described) == 1 else described)
        return
    console = Console()
    for facts in described:
        table = Table(show_header=False, box=None, title=facts["path"], title_justify="left")
        for key, value in facts.items():
            if key != "path":
                table.add_row(key, str(value))
        if not facts["georeferenced"]:
            table.add_row("note", "no georeferencing: segment needs --allow-no-crs")
        console.print(table)
