"""crrf_jax.scene.s1 (Sentinel-1 on any grid and in dB or linear power) and crrf_jax.scene.outputs (COG
outputs, quicklook, change mask), on small generated GeoTIFFs.

The reprojection is checked against an analytic field: values linear in the SAR file's own easting and
northing, which bilinear resampling reproduces exactly wherever all four neighbours exist, so every interior
pixel of the S2 grid has a known value whatever GDAL does in between.
"""

from __future__ import annotations

import itertools
import logging
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import reproject, transform, transform_bounds

from crrf_jax.data.contract import DataError
from crrf_jax.scene.outputs import SceneOutputs
from crrf_jax.scene.s1 import open_s1

S2_CRS, S1_CRS = "EPSG:32632", "EPSG:32633"
S2_TRANSFORM = from_origin(730000, 5000000, 10, 10)  # near the zone 32/33 border, so both zones are sensible
SIZE = 120


def _write(path, data, crs, transform_, descriptions=None, nodata=None):
    """(bands, H, W) float32 -> a GeoTIFF."""
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=len(data),
                       dtype="float32", crs=crs, transform=transform_, nodata=nodata) as ds:
        ds.write(data.astype(np.float32))
        for i, name in enumerate(descriptions or [], start=1):
            ds.set_band_description(i, name)
    return path


def _open(path, **kwargs):
    return open_s1(path, crs=S2_CRS, transform=S2_TRANSFORM, width=SIZE, height=SIZE, **kwargs)


def _db_field(rng, shape=(2, SIZE, SIZE)):
    return rng.uniform(-30, 2, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ S1


def test_s1_on_another_utm_zone_at_20_m_is_reprojected_onto_the_s2_grid(tmp_path):
    left, bottom, right, top = transform_bounds(S2_CRS, S1_CRS, *rasterio.transform.array_bounds(
        SIZE, SIZE, S2_TRANSFORM))
    x0, y0 = left - 100, top + 100  # the S1 grid's corner, in zone 33
    width, height = int((right - left) * 0.6 / 20), int((top - bottom + 200) / 20)  # only 60% of the S2 width
    s1_transform = from_origin(x0, y0, 20, 20)
    easting = x0 + 20 * (np.arange(width) + 0.5)
    northing = y0 - 20 * (np.arange(height) + 0.5)
    vv = np.broadcast_to(-20 + 0.005 * (easting - x0), (height, width))
    vh = np.broadcast_to((-28 + 0.004 * (y0 - northing))[:, None], (height, width))
    path = _write(tmp_path / "s1.tif", np.stack([vv, vh]), S1_CRS, s1_transform)

    with _open(path) as scene:
        assert scene.warped and scene.units == "db"
        db = np.concatenate([scene.read(0, 50), scene.read(50, SIZE)])  # by row blocks
        covered = np.concatenate([scene.coverage(0, 50), scene.coverage(50, SIZE)])
    assert db.shape == (SIZE, SIZE, 2) and db.dtype == np.float32

    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    x, y = S2_TRANSFORM.c + 10 * cols.ravel(), S2_TRANSFORM.f - 10 * rows.ravel()
    e, n = transform(S2_CRS, S1_CRS, x, y)
    e, n = np.reshape(e, (SIZE, SIZE)), np.reshape(n, (SIZE, SIZE))
    u, v = (e - x0) / 20 - 0.5, (y0 - n) / 20 - 0.5  # S1 pixel-centre coordinates of each S2 pixel
    interior = (u >= 1) & (u <= width - 2) & (v >= 1) & (v <= height - 2)
    outside = (u < -1) | (u > width) | (v < -1) | (v > height)
    assert interior.mean() > 0.4 and outside.mean() > 0.3  # both parts are well represented
    np.testing.assert_allclose(db[..., 0][interior], (-20 + 0.005 * (e - x0))[interior], atol=2e-3)
    np.testing.assert_allclose(db[..., 1][interior], (-28 + 0.004 * (y0 - n))[interior], atol=2e-3)
    assert np.isnan(db[outside]).all() and not covered[outside].any() and covered[interior].all()
    np.testing.assert_array_equal(covered, np.isfinite(db).all(-1))

    reference = np.full((2, SIZE, SIZE), np.nan, np.float32)  # GDAL's warper called directly
    reproject(np.stack([vv, vh]).astype(np.float32), reference, src_transform=s1_transform, src_crs=S1_CRS,
              dst_transform=S2_TRANSFORM, dst_crs=S2_CRS, resampling=Resampling.bilinear, src_nodata=np.nan,
              dst_nodata=np.nan)
    np.testing.assert_allclose(np.moveaxis(reference, 0, -1)[interior], db[interior], atol=1e-4)


def test_s1_on_the_s2_grid_is_read_by_plain_windows_with_nodata_as_nan(tmp_path):
    data = _db_field(np.random.default_rng(0))
    data[0, 5, 7] = -9999.0
    data[1, 9, 3] = np.inf
    path = _write(tmp_path / "s1.tif", data, S2_CRS, S2_TRANSFORM, ["VV", "VH"], nodata=-9999.0)
    with _open(path) as scene:
        assert not scene.warped
        db = scene.read(0, SIZE)
        covered = scene.coverage(0, SIZE)
    expected = np.moveaxis(data, 0, -1)
    expected[5, 7, 0] = expected[9, 3, 1] = np.nan
    np.testing.assert_array_equal(db, expected)
    assert covered.sum() == SIZE * SIZE - 2 and not covered[5, 7] and not covered[9, 3]


def test_linear_power_is_detected_with_a_warning_and_converted_and_db_can_be_forced(tmp_path, caplog):
    power = np.random.default_rng(1).uniform(1e-4, 0.8, (2, SIZE, SIZE)).astype(np.float32)
    path = _write(tmp_path / "linear_s1.tif", power, S2_CRS, S2_TRANSFORM)
    with caplog.at_level(logging.WARNING, logger="crrf_jax.scene.s1"), _open(path) as scene:
        assert scene.units == "linear"
        db = scene.read(0, SIZE)
    assert any("linear power" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(db, 10 * np.log10(np.moveaxis(power, 0, -1)), rtol=1e-5)
    with _open(path, units="db") as scene:
        assert scene.units == "db"
        np.testing.assert_array_equal(scene.read(0, SIZE), np.moveaxis(power, 0, -1))

    db_path = _write(tmp_path / "db_s1.tif", _db_field(np.random.default_rng(2)), S2_CRS, S2_TRANSFORM)
    with _open(db_path) as scene:
        assert scene.units == "db"
    with _open(db_path, units="linear") as scene:  # forced: negative "power" floors at 1e-6, -60 dB
        assert np.nanmin(scene.read(0, SIZE)) == pytest.approx(-60.0)


def test_implausible_db_values_are_reported_with_file_and_band(tmp_path, caplog):
    data = _db_field(np.random.default_rng(3))
    data[1, 0, 0] = -80.0
    path = _write(tmp_path / "s1.tif", data, S2_CRS, S2_TRANSFORM, ["VV", "VH"])
    with caplog.at_level(logging.WARNING, logger="crrf_jax.scene.s1"), _open(path) as scene:
        scene.read(0, SIZE)
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(path) in m and "band 2 (VH)" in m and "-80" in m for m in messages), messages
    assert not any("(VV)" in m for m in messages)


@pytest.mark.parametrize("descriptions", [["VH", "VV"], ["Sigma0_VH_db", "Sigma0_VV_db"], ["vh", "vv"]])
def test_swapped_band_descriptions_are_reordered(tmp_path, descriptions):
    data = _db_field(np.random.default_rng(4))  # data[0] is VH, data[1] is VV
    path = _write(tmp_path / "s1.tif", data, S2_CRS, S2_TRANSFORM, descriptions)
    with _open(path) as scene:
        assert scene.indexes == (2, 1) and scene.order == ("VV", "VH")
        db = scene.read(0, SIZE)
    np.testing.assert_array_equal(db[..., 0], data[1])
    np.testing.assert_array_equal(db[..., 1], data[0])


def test_unknown_descriptions_assume_vv_vh_and_bad_files_are_refused(tmp_path, caplog):
    data = _db_field(np.random.default_rng(5))
    path = _write(tmp_path / "s1.tif", data, S2_CRS, S2_TRANSFORM, ["band a", "band b"])
    with caplog.at_level(logging.WARNING, logger="crrf_jax.scene.s1"), _open(path) as scene:
        assert scene.indexes == (1, 2)
        np.testing.assert_array_equal(scene.read(0, 4)[..., 0], data[0, :4])
    assert any("do not name VV and VH" in r.getMessage() for r in caplog.records)

    three = _write(tmp_path / "three.tif", _db_field(np.random.default_rng(6), (3, SIZE, SIZE)), S2_CRS,
                   S2_TRANSFORM)
    with pytest.raises(DataError, match="must have 2 bands"):
        _open(three)
    hh = _write(tmp_path / "hh.tif", data, S2_CRS, S2_TRANSFORM, ["HH", "HV"])
    with pytest.raises(DataError, match="HH/HV"):
        _open(hh)
    far = _write(tmp_path / "far.tif", data, S1_CRS, from_origin(200000, 4000000, 20, 20))
    with pytest.raises(DataError, match="does not overlap"):
        _open(far)
    with pytest.raises(ValueError, match="units"):
        _open(path, units="amplitude")


# ------------------------------------------------------------------------------------------------- outputs

NAMES = ("B02", "B03", "B04", "B08")
OUT_SIZE = 1100  # large enough for COG overviews (> one 512 tile), small enough to be quick


def _prediction(rng, nodata=0):
    dn = rng.integers(1, 10001, (OUT_SIZE, OUT_SIZE, len(NAMES)), dtype=np.uint16)
    dn[:40, :60] = nodata  # an empty corner
    std = rng.uniform(0, 0.1, dn.shape).astype(np.float32)
    changed = rng.random((OUT_SIZE, OUT_SIZE)) < 0.3
    return dn, std, changed


def _outputs(tmp_path, **kwargs):
    return SceneOutputs(tmp_path / "clear.tif", crs=S2_CRS, transform=S2_TRANSFORM, width=OUT_SIZE,
                        height=OUT_SIZE, band_names=NAMES, nodata=0, **kwargs)


def _write_all(outputs, dn, std, changed, bounds=(0, 300, 700, 701, OUT_SIZE)):
    for y0, y1 in itertools.pairwise(bounds):  # uneven blocks across tile boundaries
        outputs.write_rows(y0, y1, dn[y0:y1], std[y0:y1], changed[y0:y1])


@pytest.mark.parametrize("compress", ["deflate", "zstd"])
def test_cog_outputs_are_cogs_and_keep_values_and_georeferencing(tmp_path, compress):
    dn, std, changed = _prediction(np.random.default_rng(7))
    outputs = _outputs(tmp_path, uncertainty_path=tmp_path / "std.tif", quicklook_path=tmp_path / "look.png",
                       rgb=(2, 1, 0), change_mask_path=tmp_path / "changed.tif", compress=compress)
    _write_all(outputs, dn, std, changed)
    outputs.tag(steps=4, seed=0)
    outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.tif", "clear.tif", "look.png", "std.tif"]

    empty = np.zeros((OUT_SIZE, OUT_SIZE), bool)
    empty[:40, :60] = True
    expected = {
        "clear.tif": (dn, "uint16", 0, list(NAMES)),
        "std.tif": (np.where(empty[..., None], np.nan, std), "float32", "nan", [f"{b} std" for b in NAMES]),
        "changed.tif": (np.where(empty, 255, changed.astype(np.uint8))[..., None], "uint8", 255, ["changed"]),
    }
    for name, (values, dtype, nodata, descriptions) in expected.items():
        with rasterio.open(tmp_path / name) as ds:
            assert all(shape[0] <= 512 and shape[1] <= 512 and shape[0] > 1 for shape in ds.block_shapes), name
            assert ds.overviews(1), name
            structure = ds.tags(ns="IMAGE_STRUCTURE")
            assert structure.get("LAYOUT", "COG") == "COG" and structure["COMPRESSION"] == compress.upper()
            assert ds.crs == rasterio.crs.CRS.from_string(S2_CRS) and ds.transform == S2_TRANSFORM
            assert ds.dtypes[0] == dtype and list(ds.descriptions) == descriptions
            assert str(ds.nodata) == "nan" if nodata == "nan" else ds.nodata == nodata
            assert ds.tags()["steps"] == "4" and ds.tags()["software"] == "crrf-jax"
            np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        png = rasterio.open(tmp_path / "look.png")
    with png:
        assert (png.count, png.height, png.width, png.dtypes[0]) == (3, 1024, 1024, "uint8")
        look = png.read()
    assert look[:, 0, 0].tolist() == [0, 0, 0] and look.max() == 255 and len(np.unique(look)) > 100


def test_plain_geotiff_when_cog_is_off_and_rows_in_any_order(tmp_path):
    dn = _prediction(np.random.default_rng(8))[0]
    outputs = _outputs(tmp_path, cog=False)
    for y0, y1 in ((600, OUT_SIZE), (0, 600)):
        outputs.write_rows(y0, y1, dn[y0:y1], None, None)
    outputs.commit()
    with rasterio.open(tmp_path / "clear.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG" and not ds.overviews(1)
        np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), dn)
    assert [p.name for p in tmp_path.iterdir()] == ["clear.tif"]


def test_abort_leaves_no_files_and_bad_rows_are_refused(tmp_path):
    dn, std, changed = _prediction(np.random.default_rng(9))
    outputs = _outputs(tmp_path, uncertainty_path=tmp_path / "std.tif", quicklook_path=tmp_path / "look.png",
                       change_mask_path=tmp_path / "changed.tif")
    _write_all(outputs, dn, std, changed, bounds=(0, 300, 600))
    with pytest.raises(ValueError, match="`std`"):
        outputs.write_rows(600, 700, dn[600:700], None, changed[600:700])
    with pytest.raises(ValueError, match="`dn`"):
        outputs.write_rows(600, 700, dn[600:700].astype(np.float32), std[600:700], changed[600:700])
    outputs.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["std", "mask", "out"])
def test_a_raster_failing_in_its_thread_fails_write_rows_and_commit(tmp_path, monkeypatch, failing):
    """The rasters are written side by side, in threads; an error in any of them reaches the caller of
    write_rows once all have ended, the others keep their rows, and commit (the COGs, side by side too)
    raises what a conversion raises, leaving no file behind."""
    dn, std, changed = _prediction(np.random.default_rng(10))
    outputs = _outputs(tmp_path, uncertainty_path=tmp_path / "std.tif", change_mask_path=tmp_path / "changed.tif")
    raster = getattr(outputs, failing)
    written = []

    def fail(y0, block):
        raise OSError(f"disk full writing {failing}")

    for other in {"out", "std", "mask"} - {failing}:
        inner = getattr(outputs, other).write
        monkeypatch.setattr(getattr(outputs, other), "write",
                            lambda y0, block, inner=inner, name=other: (inner(y0, block), written.append(name)))
    monkeypatch.setattr(raster, "write", fail)
    with pytest.raises(OSError, match=f"disk full writing {failing}"):
        outputs.write_rows(0, 300, dn[:300], std[:300], changed[:300])
    assert sorted(written) == sorted({"out", "std", "mask"} - {failing})
    monkeypatch.undo()
    _write_all(outputs, dn, std, changed)

    def broken_cog(src, dst, dtype):
        if dtype == {"out": "uint16", "std": "float32", "mask": "uint8"}[failing]:
            raise RuntimeError("COG conversion failed")
        SceneOutputs._to_cog(outputs, src, dst, dtype)

    monkeypatch.setattr(outputs, "_to_cog", broken_cog)
    with pytest.raises(RuntimeError, match="COG conversion failed"):
        outputs.commit()
    assert list(tmp_path.iterdir()) == []
