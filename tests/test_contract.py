"""The data contract: model range, normalisation, band specs, and the GeoTIFF open-and-check."""

import contextlib
import pickle
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine, from_origin

from crrf_jax.data import contract
from crrf_jax.data.contract import DataError

PIXEL = 10.0
WEST, NORTH = 500000.0, 5600000.0
ORIGIN = from_origin(WEST, NORTH, PIXEL, PIXEL)


def moved(right: float = 0.0, down: float = 0.0, pixel: float = PIXEL) -> Affine:
    """ORIGIN moved by (right, down) pixels, with another pixel width."""
    return from_origin(WEST + right * PIXEL, NORTH - down * PIXEL, pixel, PIXEL)


def write_tif(path: Path, data: np.ndarray, transform: Affine = ORIGIN, crs: str | None = "EPSG:32631"):
    """(C, H, W) data as a GeoTIFF with data's dtype."""
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=data.dtype, crs=crs,
                       transform=transform) as dst:
        dst.write(data)
    return path


def s1_tif(path: Path, transform: Affine = ORIGIN, **kwargs) -> Path:
    return write_tif(path, np.full((2, 16, 16), -10.0, np.float32), transform, **kwargs)


def open_pair(ref_path: Path, path: Path):
    """Opens ref_path as Sentinel-2-like reference and path as an S1 partner that must share its grid."""
    with rasterio.Env(**contract.GDAL_ENV), contextlib.ExitStack() as stack:
        ref = contract.open_geotiff(ref_path, stack, "reference", count=2, dtypes=contract.S1_DTYPES)
        return contract.open_geotiff(path, stack, "Sentinel-1", count=2, dtypes=contract.S1_DTYPES,
                                     grid_of=(ref, ref_path)).shape


def assert_names(err: pytest.ExceptionInfo, path: Path) -> None:
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert err.value.path == str(path)


# ------------------------------------------------------------------------------------------------ model range


@pytest.mark.parametrize("xp", [np, jnp])
def test_to_model_and_from_model_are_inverse(xp):
    to_model, from_model = contract.to_model, contract.from_model
    np.testing.assert_allclose(np.asarray(to_model(xp.asarray([0.0, 0.5, 1.0]))), [-1, 0, 1])
    np.testing.assert_allclose(np.asarray(from_model(xp.asarray([-1.0, 0.0, 1.0]))), [0, 0.5, 1])
    x = xp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), xp.float32)
    y = to_model(x)
    assert y.dtype == x.dtype and float(y.min()) >= -1 and float(y.max()) <= 1
    np.testing.assert_allclose(np.asarray(from_model(y)), np.asarray(x), atol=1e-7)
    np.testing.assert_allclose(np.asarray(to_model(from_model(y))), np.asarray(y), atol=1e-7)


# ---------------------------------------------------------------------------------------------- normalisation


def test_normalisation_values_and_inverse():
    np.testing.assert_allclose(
        contract.normalize_s1(np.array([-40.0, -25.0, -12.5, 0.0, 4.0])), [0, 0, 0.5, 1, 1]
    )
    np.testing.assert_allclose(
        contract.normalize_s2(np.array([0, 2500, 10000, 65535], np.uint16)), [0, 0.25, 1, 1]
    )
    dn = np.arange(0, 10001, dtype=np.uint16)
    back = contract.denormalize_s2(contract.normalize_s2(dn))
    assert back.dtype == np.uint16 and np.array_equal(back, dn)
    assert contract.denormalize_s2(np.array([-0.2, 1.7])).tolist() == [0, 10000]
    np.testing.assert_allclose(
        contract.denormalize_s1(contract.normalize_s1(np.array([-20.0, -3.0]))), [-20, -3], atol=1e-5
    )
    with pytest.raises(ValueError, match="NaN"):
        contract.denormalize_s2(np.array([np.nan]))


def test_s1_fill_and_cloud_probability_cache():
    filled = contract.normalize_s1_filled(np.array([-12.5, np.nan, np.inf, -np.inf], np.float32))
    assert filled.dtype == np.float32
    assert filled.tolist() == [0.5] + [contract.S1_NONFINITE_FILL] * 3
    assert contract.denormalize_s1(np.float32(contract.S1_NONFINITE_FILL)) == contract.S1_DB_MIN
    stored = np.arange(256, dtype=np.uint8)
    prob = contract.cloud_prob_from_uint8(stored)
    assert prob.dtype == np.float32 and prob[0] == 0 and prob[-1] == 1
    assert np.array_equal(contract.cloud_prob_to_uint8(prob), stored)
    assert contract.cloud_prob_to_uint8(np.array([-0.5, 0.3, 1.5])).tolist() == [0, 76, 255]


def _rotated_on_the_host(image: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """The reference: NumPy's rot90 over the (H, W) axes, then a left-right flip."""
    rows, cols = image.ndim - 3, image.ndim - 2
    out = np.rot90(image, turns, axes=(rows, cols))
    return np.flip(out, cols) if flip else out


def test_pending_flips_and_rotations_are_numpys_on_the_device_and_the_host():
    """All 8 transforms of a batch, single- and multi-date, compact and float: `flip_rotate_batch` under jit
    and with NumPy gives exactly np.rot90 + np.flip per sample; `normalize_batch` applies it and drops the
    key, and equals normalising the host-rotated batch bit for bit (what the pipeline did before)."""
    import jax

    rng = np.random.default_rng(0)
    ops = np.array([(t, f) for t in range(4) for f in (0, 1)], np.int8)  # (8, 2)
    batch = {"s2": rng.integers(0, 12000, (8, 6, 6, 3), dtype=np.uint16),
             "s2_cloudy": rng.integers(0, 12000, (8, 2, 6, 6, 3), dtype=np.uint16),  # two dates
             "cloud_prob": rng.integers(0, 256, (8, 2, 6, 6, 1), dtype=np.uint8),
             "s1": rng.random((8, 2, 6, 6, 2), dtype=np.float32),
             "mask": np.ones(8, bool), contract.FLIP_ROTATE: ops}
    expected = {k: np.stack([_rotated_on_the_host(batch[k][i], *ops[i]) for i in range(8)])
                for k in contract.ARRAY_KEYS}
    on_device = jax.device_get(jax.jit(contract.flip_rotate_batch)(batch))
    for out in (on_device, contract.flip_rotate_batch(batch, np)):
        assert contract.FLIP_ROTATE not in out and out["mask"].all()
        for key, want in expected.items():
            assert out[key].dtype == want.dtype and np.array_equal(out[key], want), key
    normalised = jax.device_get(jax.jit(contract.normalize_batch)(batch))
    reference = contract.normalize_batch({**expected, "mask": batch["mask"]}, np)
    assert contract.FLIP_ROTATE not in normalised
    for key in contract.ARRAY_KEYS:
        assert normalised[key].dtype == np.float32 and np.array_equal(normalised[key], reference[key]), key
    assert contract.flip_rotate_batch({"s2": batch["s2"]}, np)["s2"] is batch["s2"]  # nothing pending

    wide = {"s2": rng.integers(0, 100, (2, 4, 6, 1), dtype=np.uint16),
            contract.FLIP_ROTATE: np.array([[2, 1], [0, 0]], np.int8)}  # half turns only: not square
    np.testing.assert_array_equal(contract.flip_rotate_batch(wide, np)["s2"][0],
                                  _rotated_on_the_host(wide["s2"][0], 2, True))
    with pytest.raises(ValueError, match="odd turns need square images"):
        contract.flip_rotate_batch({**wide, contract.FLIP_ROTATE: np.array([[1, 0], [0, 0]], np.int8)}, np)


# ------------------------------------------------------------------------------------------------------ bands


def test_normalize_batch_equals_the_host_conversions_for_every_stored_value():
    """Every uint16 DN (0..65535: clipping above 10000 included) and every uint8 cloud probability becomes, on
    the device (jit), exactly the float32 of the host's `normalize_s2` / `cloud_prob_from_uint8`; floats and
    other keys pass through."""
    import jax

    dn = np.arange(65536, dtype=np.uint16).reshape(1, 256, 256, 1)
    prob = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    s1 = np.random.default_rng(0).uniform(0, 1, (1, 16, 16, 2)).astype(np.float32)
    batch = {"s2": dn, "s2_cloudy": dn[..., ::-1], "cloud_prob": prob, "s1": s1, "mask": np.ones(1, bool)}
    on_device = jax.device_get(jax.jit(contract.normalize_batch)(batch))
    for out in (on_device, contract.normalize_batch(batch, np)):
        assert all(out[k].dtype == np.float32 for k in contract.ARRAY_KEYS)
        assert np.array_equal(out["s2"], contract.normalize_s2(dn))
        assert np.array_equal(out["s2_cloudy"], contract.normalize_s2(dn[..., ::-1]))
        assert np.array_equal(out["cloud_prob"], contract.cloud_prob_from_uint8(prob))
        assert np.array_equal(out["s1"], s1) and out["mask"].dtype == bool
    assert contract.normalize_batch(batch, np)["s1"] is s1  # float32 is already the contract
    half = contract.normalize_array("s2", np.float16([0.5]), np)
    assert half.dtype == np.float32 and half[0] == 0.5
    with pytest.raises(TypeError, match=r"batch\['s2'\] is uint8"):
        contract.normalize_array("s2", np.zeros(3, np.uint8), np)


def test_resolve_bands():
    assert contract.resolve_bands(None) == tuple(range(13))
    assert contract.resolve_bands("all") == tuple(range(13))
    assert contract.resolve_bands("rgb") == contract.RGB == (3, 2, 1)
    assert contract.resolve_bands("RGB") == (3, 2, 1)
    assert [contract.S2_BANDS[i] for i in contract.RGB] == ["B04", "B03", "B02"]
    assert contract.resolve_bands(["B04", "b8a", 0, np.int64(12)]) == (3, 8, 0, 12)
    assert contract.resolve_bands("B02, B03") == (1, 2)
    for bad, match in [
        (["B13"], "unknown"),
        ([13], "out of range"),
        ([-1], "out of range"),
        (["B02", 1], "twice"),
        ([], "empty"),
        ([True], "neither"),
        ([1.0], "neither"),
    ]:
        with pytest.raises(ValueError, match=match):
            contract.resolve_bands(bad)


@pytest.mark.parametrize(
    "spec, bands",
    [
        (None, tuple(range(13))),
        ("", tuple(range(13))),  # a config's default
        ("  ", tuple(range(13))),
        ("all", tuple(range(13))),
        ("rgb", (3, 2, 1)),
        ("B02,B03", (1, 2)),
        ("3,2,1", (3, 2, 1)),  # indices in a string, as configs write them
        (" b8a , 3,B12 ", (8, 3, 12)),
        (["B04", "8"], (3, 8)),
        (("1", 2), (1, 2)),
        ((3, 2, 1), (3, 2, 1)),
    ],
)
def test_the_one_band_spec_parser_reads_every_form(spec, bands):
    assert contract.resolve_bands(spec) == bands


@pytest.mark.parametrize(
    "spec, match",
    [("B02,B13", "unknown"), ("3,13", "out of range"), ("B04,3", "twice"), (",", "empty"), (3, "sequence")],
)
def test_the_one_band_spec_parser_refuses_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        contract.resolve_bands(spec)


def test_rgb_channels():
    assert contract.rgb_channels(None) == contract.RGB
    assert contract.rgb_channels("rgb") == (0, 1, 2)
    assert contract.rgb_channels("B02,B03,B04,B08") == (2, 1, 0)
    assert contract.rgb_channels((7, 1, 2, 3)) == (3, 2, 1)
    assert contract.rgb_channels("B02,B03") == (0, 0, 0)  # no B04: a grey view of the first band


# --------------------------------------------------------------------------------------------------- GeoTIFFs


def test_grid_within_the_tolerance_is_accepted(tmp_path):
    ref = s1_tif(tmp_path / "ref.tif")
    assert contract.GRID_TOLERANCE == 1e-3
    nudged = s1_tif(tmp_path / "nudged.tif", moved(0.0005, -0.0003))
    assert open_pair(ref, nudged) == (16, 16)
    # A pixel size off by 1e-6 moves the far corner by 16e-6 pixels: still the same grid.
    scaled = s1_tif(tmp_path / "scaled.tif", moved(pixel=PIXEL * (1 + 1e-6)))
    assert open_pair(ref, scaled) == (16, 16)
    assert open_pair(ref, s1_tif(tmp_path / "no_crs.tif", crs=None)) == (16, 16)  # taken to share ref's CRS


@pytest.mark.parametrize(
    "name, transform, match",
    [
        ("shifted.tif", moved(0.002), r"\(0.002 pixels apart\)"),
        ("half.tif", moved(down=0.5), r"\(0.5 pixels apart\)"),  # the old dataset rule took it
        # 1e-4 of a pixel per pixel adds up to 1.6e-3 pixels at the far corner of 16 pixels.
        ("scaled.tif", moved(pixel=PIXEL * (1 + 1e-4)), r"\(0.0016 pixels apart\)"),
    ],
)
def test_grid_off_by_more_than_the_tolerance_is_refused_naming_the_file(tmp_path, name, transform, match):
    ref = s1_tif(tmp_path / "ref.tif")
    off = s1_tif(tmp_path / name, transform)
    expected = rf"not on the grid of {re.escape(str(ref))}: transform .* {match}"
    with pytest.raises(DataError, match=expected) as err:
        open_pair(ref, off)
    assert_names(err, off)


def test_grid_size_and_crs_are_checked(tmp_path):
    ref = s1_tif(tmp_path / "ref.tif")
    small = write_tif(tmp_path / "small.tif", np.zeros((2, 16, 15), np.float32))
    with pytest.raises(DataError, match="size 16x15 vs 16x16") as err:
        open_pair(ref, small)
    assert_names(err, small)
    utm32 = s1_tif(tmp_path / "utm32.tif", crs="EPSG:32632")
    with pytest.raises(DataError, match="CRS EPSG:32632 vs EPSG:32631") as err:
        open_pair(ref, utm32)
    assert_names(err, utm32)


def _crs(path: Path, env: dict):
    with rasterio.Env(**env), rasterio.open(path) as ds:
        return ds.crs


_GDAL_DEFAULT = {k: v for k, v in contract.GDAL_ENV.items() if k != "GTIFF_SRS_SOURCE"}


@pytest.mark.parametrize("crs", ["EPSG:32631", "EPSG:32750", "EPSG:3857", "EPSG:3035",
                                 "+proj=utm +zone=13 +datum=WGS84 +units=m +no_defs", "EPSG:4326"])
def test_the_readers_crs_is_gdals_default_for_files_gdal_writes(tmp_path, crs):
    """GDAL_ENV builds the CRS from the GeoKeys alone (faster opens). Projected CRSs come out identical to
    GDAL's default reading, WKT and all; a geographic one lacks the EPSG authority nodes in its WKT but is
    the same CRS, and a file written with it reads back exactly as the original."""
    assert contract.GDAL_ENV["GTIFF_SRS_SOURCE"] == "GEOKEYS"
    path = s1_tif(tmp_path / "file.tif", crs=crs)
    ours, default = _crs(path, contract.GDAL_ENV), _crs(path, _GDAL_DEFAULT)
    assert ours == default and ours.to_epsg() == default.to_epsg()
    if ours.is_projected:
        assert ours.to_wkt() == default.to_wkt()
    copy = s1_tif(tmp_path / "copy.tif", crs=ours)
    assert _crs(copy, _GDAL_DEFAULT).to_wkt() == default.to_wkt()


def test_the_readers_crs_is_gdals_default_for_the_real_sample(sample_root):
    files = sorted(sample_root.rglob("*.tif"))
    assert len(files) >= 6
    for path in files:
        assert _crs(path, contract.GDAL_ENV).to_wkt() == _crs(path, _GDAL_DEFAULT).to_wkt(), path


def test_open_geotiff_names_the_file(tmp_path):
    ref = s1_tif(tmp_path / "ref.tif")
    (tmp_path / "text.tif").write_text("not a GeoTIFF")
    one_band = write_tif(tmp_path / "one.tif", np.zeros((1, 16, 16), np.float32))
    integers = write_tif(tmp_path / "int.tif", np.zeros((2, 16, 16), np.uint16))
    for path, reason in [
        (tmp_path / "missing.tif", "Sentinel-1 file does not exist"),
        (tmp_path / "text.tif", "cannot open Sentinel-1 as a GeoTIFF"),
        (one_band, "Sentinel-1 must have 2 bands, found 1"),
        (integers, "Sentinel-1 must be float32 or float64, found uint16"),
    ]:
        with pytest.raises(DataError, match=f"^{re.escape(f'{path}: {reason}')}") as err:
            open_pair(ref, path)
        assert_names(err, path)
    with contextlib.ExitStack() as stack:
        with pytest.raises(DataError, match="cloud probability must have 2 bands, found 1"):
            contract.open_geotiff(one_band, stack, "cloud probability", count=2, dtypes=("float32",))
        ds = contract.open_geotiff(one_band, stack, "cloud probability", count=1, dtypes=("float32",))
        assert (ds.count, ds.dtypes) == (1, ("float32",))


def test_data_error_pickles():
    err = pickle.loads(pickle.dumps(DataError("/a/b.tif", "broken")))
    assert isinstance(err, DataError) and isinstance(err, ValueError)
    assert (err.path, err.reason, str(err)) == ("/a/b.tif", "broken", "/a/b.tif: broken")


def test_least_cloudy_dates_rank_by_mean_ties_to_the_earlier_in_date_order():
    means = [0.5, 0.2, 0.2, 0.9, 0.1]  # dates 1 and 2 tie
    prob = np.stack([np.full((4, 4, 1), m, np.float32) for m in means])  # (T, H, W, 1)
    assert contract.least_cloudy_dates(prob, 1).tolist() == [4]
    assert contract.least_cloudy_dates(prob, 2).tolist() == [1, 4]  # date order, not rank order
    assert contract.least_cloudy_dates(prob, 3).tolist() == [1, 2, 4]
    assert contract.least_cloudy_dates(prob, 5).tolist() == [0, 1, 2, 3, 4]
    batch = np.stack([prob, prob[::-1]])  # (B, T, H, W, 1)
    assert contract.least_cloudy_dates(batch, 2).tolist() == [[1, 4], [0, 2]]
    for k in (0, 6):
        with pytest.raises(ValueError, match="1 <= k <= T"):
            contract.least_cloudy_dates(prob, k)
