"""Make sample_tiles/ from the real rasters in ../shared/data (run once by developers).

Writes a 512×512 crop of a NAIP scene (North Dakota prairie potholes, 5 m pixels,
public-domain imagery; lakes, fields, roads) as a Cloud-Optimized GeoTIFF, copies a real
0.6 m aerial COG (rasterio test data, CC0), and records provenance beside them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import rasterio
import rasterio.shutil
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

ROOT = Path(__file__).resolve().parents[1]


def crop_cog(src: Path, dst: Path, window: Window) -> None:
    tmp = dst.with_suffix(".tmp.tif")
    with rasterio.open(src) as ds:
        profile = ds.profile | {
            "width": int(window.width),
            "height": int(window.height),
            "transform": window_transform(window, ds.transform),
            "driver": "GTiff",
        }
        data = ds.read(window=window)
        with rasterio.open(tmp, "w", **profile) as out:
            out.write(data)
            out.colorinterp = ds.colorinterp
            out.descriptions = ds.descriptions
    rasterio.shutil.copy(tmp, dst, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE="256")
    tmp.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "sample_tiles")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    naip = args.shared / "aerial" / "naip_m_4709963_se_14_1_20200831.tif"
    crop_cog(naip, args.out / "naip_prairie_512.tif", Window(300, 100, 512, 512))
    shutil.copyfile(args.shared / "geotiff" / "cogeo.tif", args.out / "aerial_korea_0p6m.tif")
    shutil.copyfile(
        args.shared / "aerial" / "LICENSE-opengeos-data.txt", args.out / "LICENSE-opengeos-data.txt"
    )
    shutil.copyfile(
        args.shared / "geotiff" / "LICENSE-rasterio.txt", args.out / "LICENSE-rasterio.txt"
    )
    print(f"wrote {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
