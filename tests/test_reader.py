import numpy as np
import pytest
import rasterio

from drseg_cli.errors import InputError, UsageError
from drseg_cli.raster.reader import TileReader, compute_stretch, forget_warnings, inspect_raster
from tests.helpers import DATA, write_geotiff

LANDSAT = DATA / "LC08_L1TP_224077_20200518_20200518_01_RT_B2_60m.TIF"


def test_default_bands_follow_colour_interpretation():
    assert inspect_raster(DATA / "RGBA.uint16.tif").bands == (3, 2, 1)  # stored B,G,R,alpha
    info = inspect_raster(DATA / "rgbn_suba.tif")
    assert info.bands == (1, 2, 3) and info.alpha_band is None
    assert inspect_raster(DATA / "RGBA.uint16.tif").alpha_band == 4


def test_single_band_is_replicated_with_a_warning(caplog):
    forget_warnings()  # warned once per run: an earlier test may have opened the file
    with caplog.at_level("WARNING"):
        info = inspect_raster(LANDSAT)
    assert info.bands == (1, 1, 1)
    assert "replicated" in caplog.text


def test_explicit_bands_are_checked():
    assert inspect_raster(DATA / "rgbn_suba.tif", [4, 3, 2]).bands == (4, 3, 2)
    with pytest.raises(InputError, match="band 5 but the file has 4"):
        inspect_raster(DATA / "rgbn_suba.tif", [5, 3, 2])
    with pytest.raises(UsageError, match="1 or 3 band numbers"):
        inspect_raster(DATA / "rgbn_suba.tif", [1, 2])


def test_missing_crs_is_refused_unless_allowed():
    with pytest.raises(InputError, match=r"float_nan.tif: has no CRS.*--allow-no-crs"):
        inspect_raster(DATA / "float_nan.tif")
    assert inspect_raster(DATA / "float_nan.tif", allow_no_crs=True).crs is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "file not found"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_text("hello, not a raster"), p)[1], "not a raster GDAL can read"),
    ],
)
def test_unusable_paths(tmp_path, make, message):
    path = make(tmp_path / "x.tif")
    with pytest.raises(InputError, match=message):
        inspect_raster(path)


def test_complex_dtype_is_refused(tmp_path):
    p = write_geotiff(tmp_path / "c.tif", np.ones((1, 8, 8), np.complex64))
    with pytest.raises(InputError, match="complex"):
        inspect_raster(p)


def test_uint16_stretch_is_scene_wide_not_per_tile():
    """The same pixel gets the same value whichever tile it is read in."""
    info = inspect_raster(LANDSAT)
    stretch = compute_stretch(info)
    assert stretch is not None and stretch.low[0] < stretch.high[0]
    with TileReader(info, stretch) as reader:
        a, _ = reader.read(0, 0, 256)
        b, _ = reader.read(128, 96, 256)
    np.testing.assert_array_equal(a[:, 96:256, 128:256], b[:, 0:160, 0:128])
    with rasterio.open(LANDSAT) as ds:
        raw = ds.read(1, window=((0, 256), (0, 256))).astype(np.float32)
    expected = np.clip((raw - stretch.low[0]) / (stretch.high[0] - stretch.low[0]), 0, 1)
    np.testing.assert_allclose(a[0], expected, atol=1e-6)
    # the decimated sample gives the full-resolution scene percentiles
    with rasterio.open(LANDSAT) as ds:
        full = ds.read(1).astype(np.float64)
    lo, hi = np.percentile(full, (2, 98))
    assert abs(stretch.low[0] - lo) <= 0.02 * (hi - lo)
    assert abs(stretch.high[0] - hi) <= 0.02 * (hi - lo)


def test_uint8_is_not_stretched():
    info = inspect_raster(DATA / "RGB.byte.tif")
    assert compute_stretch(info) is None
    with TileReader(info, None) as reader, rasterio.open(DATA / "RGB.byte.tif") as ds:
        rgb, valid = reader.read(300, 300, 64)
        raw = ds.read(window=((300, 364), (300, 364)))
    np.testing.assert_allclose(rgb, raw / 255.0, atol=1e-7)


def test_nodata_and_alpha_masks_are_honoured():
    with rasterio.open(DATA / "RGBA.uint16.tif") as ds:
        alpha = ds.read(4, window=((0, 128), (0, 128)))
    info = inspect_raster(DATA / "RGBA.uint16.tif")
    with TileReader(info, compute_stretch(info)) as reader:
        _, valid = reader.read(0, 0, 128)
    np.testing.assert_array_equal(valid, alpha > 0)
    info = inspect_raster(DATA / "RGB.byte.tif")
    with TileReader(info, None) as reader, rasterio.open(DATA / "RGB.byte.tif") as ds:
        _, valid = reader.read(0, 300, 128)
        data = ds.read(window=((300, 428), (0, 128)))
    np.testing.assert_array_equal(valid, data.any(axis=0))
    assert 0 < valid.mean() < 1


def test_scene_smaller_than_a_tile_is_reflection_padded():
    info = inspect_raster(DATA / "float_raster_with_nodata.tif")
    assert (info.width, info.height) == (13, 12)
    with TileReader(info, compute_stretch(info)) as reader:
        rgb, valid = reader.read(0, 0, 32)
    assert rgb.shape == (3, 32, 32) and valid.shape == (32, 32)
    assert not valid[12:].any() and not valid[:, 13:].any()
    np.testing.assert_array_equal(rgb[:, :, 13], rgb[:, :, 11])  # reflected, not zero
    assert np.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() <= 1


def test_corrupt_block_fails_with_one_line_error():
    info = inspect_raster(DATA / "corrupt.tif")  # header is fine
    with TileReader(info, None) as reader, pytest.raises(InputError, match="read failed"):
        for y in range(0, 1024, 256):
            for x in range(0, 1024, 256):
                reader.read(x, y, 256)
