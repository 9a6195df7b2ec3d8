"""Sentinel-2 inputs in the forms users have them (crrf_jax.scene.s2): SAFE products (folder and zip, L1C and
L2A), folders of per-band files, stacked files; offsets, units, B10 and the errors, on generated fixtures.

The exact check of resampling: every band is a plane in map coordinates, f(u, v) = c + a u + b v (u, v in 10 m
pixels from the scene's corner), sampled at the centres of its own 10, 20 or 60 m pixels and stored with ESA's
+1000 DN offset. Bilinear interpolation reproduces a plane exactly between the coarse pixel centres, so the
10 m grid must read f at its own pixel centres there, to float round-off: a half-pixel shift, a wrong band file
or a missed offset shows as an error of whole DN. The stacked GeoTIFF holds f sampled at the 10 m centres.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT

from crrf_jax.data import contract
from crrf_jax.data.contract import DataError
from crrf_jax.scene import s2
from crrf_jax.scene.s2 import open_s2

SIZE = 60  # 10 m pixels: 30 at 20 m, 10 at 60 m
X0, Y0 = 600000.0, 5300040.0
CRS = "EPSG:32631"
OFFSET = 1000
TILE = "T31UFQ_20230601T103631"
PRODUCT = "S2B_MSIL{level}_20230601T103631_N0509_R008_T31UFQ_20230601T140000.SAFE"
# Pixels whose 10 m centre lies between the centres of every coarser grid (the 60 m ones: 3 .. 57 in u).
INTERIOR = slice(3, SIZE - 3)
TEN_M = [b for b in contract.S2_BANDS if s2.NATIVE_RESOLUTION[b] == 10]


def plane(band: str, step: int) -> np.ndarray:
    """Band `band`'s plane sampled at the centres of pixels `step` 10 m pixels wide: (SIZE/step, SIZE/step) DN
    without offset; integers at every sampling (even slopes)."""
    k = contract.S2_BANDS.index(band)
    centres = np.arange(SIZE // step) * step + step / 2
    u, v = np.meshgrid(centres, centres)
    return 1500 + 100 * k + 2 * (1 + k % 3) * u + 2 * (1 + (k + 1) % 3) * v


def write(path: Path, data: np.ndarray, step: int = 1, crs: str = CRS, driver: str | None = None, **profile):
    """A raster (bands, h, w) or (h, w) on the scene's grid at `step` x 10 m pixels."""
    data = data[None] if data.ndim == 2 else data
    driver = driver or ("JP2OpenJPEG" if path.suffix == ".jp2" else "GTiff")
    extra = {"QUALITY": 100, "REVERSIBLE": "YES"} if driver == "JP2OpenJPEG" else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver=driver, width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=Affine(10.0 * step, 0, X0, 0, -10.0 * step, Y0),
                       **extra, **profile) as ds:
        ds.write(data)
    return path


def stored(band: str) -> np.ndarray:
    """The band file's uint16 DN: its plane + the offset; the first 10 m pixel is nodata (0) in 10 m bands."""
    step = s2.NATIVE_RESOLUTION[band] // 10
    dn = (plane(band, step) + OFFSET).astype(np.uint16)
    if step == 1:
        dn[0, 0] = 0
    return dn


def mtd_xml(level: str, baseline: str = "05.09", offsets: bool = True) -> str:
    l2a = level == "2A"
    q, add = ("BOA_QUANTIFICATION_VALUE", "BOA_ADD_OFFSET") if l2a else ("QUANTIFICATION_VALUE", "RADIO_ADD_OFFSET")
    bands = [b for b in contract.S2_BANDS]
    spectral = "".join(f'<Spectral_Information bandId="{i}" physicalBand="B{b[1:].lstrip("0")}"/>'
                       for i, b in enumerate(bands))
    adds = "".join(f'<{add} band_id="{i}">-{OFFSET}</{add}>' for i in range(len(bands))) if offsets else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?><n1:Level-{level}_User_Product '
            f'xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-{level}.xsd"><n1:General_Info>'
            f"<Product_Info><PROCESSING_LEVEL>Level-{level}</PROCESSING_LEVEL>"
            f"<PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE></Product_Info>"
            f'<Product_Image_Characteristics><{q} unit="none">10000</{q}>'
            f"<Radiometric_Offset_List>{adds}</Radiometric_Offset_List>"
            f"<Spectral_Information_List>{spectral}</Spectral_Information_List>"
            f"</Product_Image_Characteristics></n1:General_Info></n1:Level-{level}_User_Product>")


def make_product(root: Path, level: str = "1C", ext: str = ".jp2") -> Path:
    """A SAFE-like product: MTD XML and GRANULE/*/IMG_DATA band files (L2A: R10m/R20m/R60m, with coarser copies
    of finer bands holding other values, and SCL/TCI files, which must be ignored)."""
    safe = root / PRODUCT.format(level=level)
    img = safe / "GRANULE" / f"L{level}_T31UFQ_A032000_20230601T104000" / "IMG_DATA"
    (safe / f"MTD_MSIL{level}.xml").parent.mkdir(parents=True, exist_ok=True)
    (safe / f"MTD_MSIL{level}.xml").write_text(mtd_xml(level))
    if level == "1C":
        for band in contract.S2_BANDS:
            write(img / f"{TILE}_{band}{ext}", stored(band), s2.NATIVE_RESOLUTION[band] // 10)
        return safe
    for band in s2.L2A_BANDS:
        native = s2.NATIVE_RESOLUTION[band]
        write(img / f"R{native}m" / f"{TILE}_{band}_{native}m{ext}", stored(band), native // 10)
        for coarser in (r for r in (20, 60) if r > native):  # L2A's resampled copies: not to be read
            write(img / f"R{coarser}m" / f"{TILE}_{band}_{coarser}m{ext}",
                  np.full((SIZE * 10 // coarser,) * 2, 7, np.uint16), coarser // 10)
    write(img / "R20m" / f"{TILE}_SCL_20m{ext}", np.full((30, 30), 4, np.uint8), 2)
    write(img / "R10m" / f"{TILE}_TCI_10m{ext}", np.zeros((3, SIZE, SIZE), np.uint8))
    return safe


@pytest.fixture(scope="module")
def l1c(tmp_path_factory) -> Path:
    return make_product(tmp_path_factory.mktemp("l1c"))


@pytest.fixture(scope="module")
def stacked(tmp_path_factory) -> Path:
    """The same scene as one float32 13-band GeoTIFF of DN (offset included) at 10 m."""
    data = np.stack([plane(b, 1) + OFFSET for b in contract.S2_BANDS]).astype(np.float32)
    return write(tmp_path_factory.mktemp("stacked") / "scene.tif", data)


def zip_of(safe: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for file in sorted(safe.rglob("*")):
            z.write(file, file.relative_to(safe.parent).as_posix())
    return dest


def check_same_as_stacked(scene, stacked: Path) -> None:
    """The scene reads what the stacked file reads: exactly on 10 m bands (but the nodata pixel), to float
    round-off between the coarse pixel centres elsewhere; and the plane itself, with the offset removed."""
    with open_s2(stacked, offset=OFFSET) as ref:
        assert (scene.crs, scene.transform, scene.width, scene.height) == (ref.crs, ref.transform, SIZE, SIZE)
        expected = ref.read(0, SIZE, contract.S2_BANDS)
    got = scene.read(0, SIZE, contract.S2_BANDS)
    assert got.shape == (SIZE, SIZE, 13) and got.dtype == np.float32
    np.testing.assert_array_equal(expected, np.stack([plane(b, 1) for b in contract.S2_BANDS], -1))
    ten = [contract.S2_BANDS.index(b) for b in TEN_M]
    np.testing.assert_array_equal(got[..., ten].reshape(-1, 4)[1:], expected[..., ten].reshape(-1, 4)[1:])
    np.testing.assert_allclose(got[INTERIOR, INTERIOR], expected[INTERIOR, INTERIOR], atol=1e-2, rtol=0)
    coarse = [i for i, b in enumerate(contract.S2_BANDS) if b not in TEN_M]
    assert np.all(np.isfinite(got)) and got[..., coarse].min() >= 1500  # edges extend the band, not blanked
    assert got[0, 0, ten].tolist() == [0.0] * 4  # nodata reads 0


def test_safe_product_reads_like_the_stacked_file_with_the_offset_removed(l1c, stacked):
    with open_s2(l1c) as scene:
        assert (scene.kind, scene.level, scene.offset, scene.nodata) == ("safe", "L1C", OFFSET, 0.0)
        assert scene.bands == contract.S2_BANDS
        check_same_as_stacked(scene, stacked)
        valid = scene.valid(0, SIZE)
        assert valid.shape == (SIZE, SIZE) and not valid[0, 0] and valid.sum() == SIZE * SIZE - 1
        rows = np.concatenate([scene.read(y0, y1, ["B8A", "B01", "B02"]) for y0, y1 in ((0, 7), (7, 31),
                                                                                         (31, SIZE))])
        np.testing.assert_array_equal(rows, scene.read(0, SIZE, ["B8A", "B01", "B02"]))  # windows = whole


def test_zipped_safe_product_reads_the_same(l1c, stacked, tmp_path):
    with open_s2(zip_of(l1c, tmp_path / "product.zip")) as scene:
        assert (scene.kind, scene.level, scene.offset) == ("safe", "L1C", OFFSET)
        assert scene.source_path("B02").startswith("/vsizip/")
        check_same_as_stacked(scene, stacked)


def test_band_folder_reads_the_same_and_warns_about_the_unknown_offset(l1c, stacked, tmp_path, caplog):
    folder = tmp_path / "bands"
    shutil.copytree(next((l1c / "GRANULE").iterdir()) / "IMG_DATA", folder)
    with caplog.at_level(logging.WARNING, "crrf_jax"), open_s2(folder) as scene:
        assert (scene.kind, scene.offset, scene.nodata) == ("bands", 0.0, None)
        assert "--s2-offset 1000" in caplog.text  # the ESA names are dated 2023
    with open_s2(folder, offset=OFFSET) as scene:
        assert scene.valid(0, SIZE).all()  # band files without nodata: every pixel counts
        check_same_as_stacked(scene, stacked)


class _Counting:
    """A WarpedVRT that counts its reads."""

    def __init__(self, vrt):
        self.vrt, self.reads = vrt, 0

    def read(self, *args, **kwargs):
        self.reads += 1
        return self.vrt.read(*args, **kwargs)


@pytest.mark.parametrize("resampling", ["bilinear", "cubic"])
def test_coarse_band_with_an_empty_area_reads_as_the_nodata_aware_warp(tmp_path, resampling):
    """Rows of a 20 m band far from its empty (0) area are warped by the plain kernel, the rest by the
    nodata-aware one; every window must read what the nodata-aware warp of the whole band reads."""
    safe = make_product(tmp_path, ext=".tif")
    b05 = next(safe.rglob("*_B05.tif"))
    rng = np.random.default_rng(0)
    dn = rng.integers(1500, 9000, (SIZE // 2, SIZE // 2)).astype(np.uint16)  # noisy: kernels differ
    dn[12:15, 4:20] = 0  # 20 m rows 12..14: 10 m rows 24..29
    write(b05, dn, 2)
    grid = next(safe.rglob("*_B02.tif"))
    with rasterio.open(grid) as g, rasterio.open(b05) as ds, WarpedVRT(
            ds, crs=g.crs, transform=g.transform, width=g.width, height=g.height, src_nodata=0, nodata=0,
            resampling=s2.RESAMPLING[resampling], dtype="float32") as reference:
        whole = reference.read(1)
        with WarpedVRT(ds, crs=g.crs, transform=g.transform, width=g.width, height=g.height,
                       resampling=s2.RESAMPLING[resampling], dtype="float32") as plain:
            plain_whole = plain.read(1)
    assert not np.array_equal(whole[20:34], plain_whole[20:34])  # the plain kernel is wrong near the hole
    with open_s2(safe, resampling=resampling) as scene:
        reader = scene._sources["B05"].reader
        reader._plain, reader._masked = _Counting(reader._plain), _Counting(reader._masked)
        for y0, y1 in [(0, 6), (6, 14), (14, 22), (22, 30), (30, 38), (38, 44), (44, 60), (0, 60)]:
            got = scene.read(y0, y1, ["B05"])[..., 0]
            expected = np.where(whole[y0:y1] == 0, 0, np.maximum(whole[y0:y1] - OFFSET, 0))
            np.testing.assert_array_equal(got, expected, err_msg=f"rows {y0}..{y1}")
        # Windows in rows 0..14 and 38..60 stay over MARGIN source rows from the hole; the others reach it.
        assert (reader._plain.reads, reader._masked.reads) == (4, 4)


def test_l2a_product_has_no_b10_unless_filled(tmp_path, caplog):
    safe = make_product(tmp_path, level="2A", ext=".tif")
    with open_s2(safe) as scene:
        assert (scene.kind, scene.level, scene.offset) == ("safe", "L2A", OFFSET)
        assert scene.bands == s2.L2A_BANDS
        assert "_B02_10m" in scene.source_path("B02") and "_B05_20m" in scene.source_path("B05")
        np.testing.assert_array_equal(scene.read(0, SIZE, ["B02"])[1:, 1:, 0], plane("B02", 1)[1:, 1:])
        np.testing.assert_allclose(scene.read(0, SIZE, ["B05"])[INTERIOR, INTERIOR, 0],
                                   plane("B05", 1)[INTERIOR, INTERIOR], atol=1e-2)
        with pytest.raises(DataError, match="L2A product without B10.*--fill-b10") as err:
            scene.read(0, 4, ["B02", "B10"])
        assert err.value.path == str(safe)
        with caplog.at_level(logging.WARNING, "crrf_jax"):
            s2.warn_level_mismatch(scene, "L1C")
        assert "L2A input but the model was trained on L1C" in caplog.text
    with open_s2(safe, fill_b10=True) as scene:
        assert "B10" in scene.bands
        out = scene.read(10, 20, ["B10", "B02"])
        assert np.all(out[..., 0] == s2.B10_FILL_DN)
        np.testing.assert_array_equal(out[..., 1], plane("B02", 1)[10:20])


def test_reflectance_floats_are_detected_and_units_can_be_forced(tmp_path, caplog):
    dn = np.stack([plane(b, 1) for b in contract.S2_BANDS]).astype(np.float32)
    path = write(tmp_path / "reflectance.tif", dn / 10000)
    with caplog.at_level(logging.WARNING, "crrf_jax"), open_s2(path) as scene:
        np.testing.assert_allclose(scene.read(0, SIZE, contract.S2_BANDS), np.moveaxis(dn, 0, -1), rtol=1e-6)
    assert str(path) in caplog.text and "reflectance" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "crrf_jax"), open_s2(path, units="dn") as scene:
        np.testing.assert_allclose(scene.read(0, 5, ["B04"])[..., 0], dn[3, :5] / 10000, rtol=1e-6)
    assert "reflectance" not in caplog.text
    dn_path = write(tmp_path / "dn.tif", dn)  # float DN stay DN
    with open_s2(dn_path) as scene:
        np.testing.assert_array_equal(scene.read(0, SIZE, ["B12"])[..., 0], dn[12])


def test_named_stacked_bands_are_read_by_name_and_odd_values_reported(tmp_path, caplog):
    names = list(reversed(s2.L2A_BANDS))  # 12 bands, no B10, any order, described by name
    data = np.stack([plane(b, 1) for b in names]).astype(np.float32)
    data[names.index("B03"), 5, 5] = -50
    path = write(tmp_path / "l2a_stack.tif", data)
    with rasterio.open(path, "r+") as ds:
        for i, name in enumerate(names, start=1):
            ds.set_band_description(i, name.replace("B0", "B"))  # 'B3', 'B8A'...: still band names
    with open_s2(path) as scene, caplog.at_level(logging.WARNING, "crrf_jax"):
        assert scene.bands == s2.L2A_BANDS and scene.level == "L2A"  # from the file name
        out = scene.read(0, SIZE, ["B02", "B03"])
        np.testing.assert_array_equal(out[..., 0], plane("B02", 1))
        assert out[5, 5, 1] == 0  # clipped
        with pytest.raises(DataError, match="without B10"):
            scene.read(0, 1, ["B10"])
    assert f"{path}: band B03 has values from -50" in caplog.text


def test_metadata_offsets_by_baseline():
    meta = s2.parse_metadata(mtd_xml("1C", "05.09").encode(), "MTD_MSIL1C.xml")
    assert (meta.level, meta.baseline, meta.quantification) == ("L1C", (5, 9), 10000)
    assert meta.offsets == {b: 1000.0 for b in contract.S2_BANDS}
    old = s2.parse_metadata(mtd_xml("1C", "03.01", offsets=False).encode(), "x")
    new = s2.parse_metadata(mtd_xml("2A", "04.00", offsets=False).encode(), "x")
    assert (old.offsets, old.baseline, new.level, new.baseline) == (None, (3, 1), "L2A", (4, 0))
    with pytest.raises(DataError, match="not valid XML"):
        s2.parse_metadata(b"<broken", "MTD_MSIL1C.xml")


def test_old_baseline_product_has_no_offset_and_argument_overrides(tmp_path):
    safe = make_product(tmp_path)
    (safe / "MTD_MSIL1C.xml").write_text(mtd_xml("1C", "03.01", offsets=False))
    with open_s2(safe) as scene:
        assert scene.offset == 0
        assert scene.read(1, 2, ["B02"])[0, 1, 0] == plane("B02", 1)[1, 1] + OFFSET
    with open_s2(safe, offset=400) as scene:
        assert scene.read(1, 2, ["B02"])[0, 1, 0] == plane("B02", 1)[1, 1] + OFFSET - 400


@pytest.mark.parametrize("band_files", [{"drop": "B05"}, {"twice": "B02"}, {"crs": "B11"}, {"garbage": "B03"}])
def test_bad_band_files_are_refused_naming_the_file(tmp_path, band_files):
    folder = tmp_path / "bands"
    for band in contract.S2_BANDS:
        if band != band_files.get("drop"):
            write(folder / f"{band}.tif", stored(band), s2.NATIVE_RESOLUTION[band] // 10,
                  crs="EPSG:32632" if band == band_files.get("crs") else CRS)
    if "twice" in band_files:
        shutil.copy(folder / "B02.tif", folder / f"{TILE}_B02_10m.tif")
        with pytest.raises(DataError, match="second file for band B02") as err:
            open_s2(folder)
        assert {err.value.path, err.value.reason.split("other is ")[1].split(")")[0]} == {
            str(folder / "B02.tif"), str(folder / f"{TILE}_B02_10m.tif")}
        return
    if "crs" in band_files:
        with pytest.raises(DataError, match="CRS EPSG:32632 differs") as err:
            open_s2(folder)
        assert err.value.path == str(folder / "B11.tif")
        return
    if "garbage" in band_files:
        (folder / "B03.tif").write_bytes(b"not a raster at all")
        with pytest.raises(DataError, match="cannot open") as err:
            open_s2(folder)
        assert err.value.path == str(folder / "B03.tif")
        return
    with open_s2(folder) as scene:  # a folder may hold a band subset
        assert "B05" not in scene.bands
        with pytest.raises(DataError, match="has no band B05") as err:
            scene.read(0, 1, ["B05"])
        assert err.value.path == str(folder)


def test_safe_product_missing_a_band_is_refused(tmp_path):
    safe = make_product(tmp_path, ext=".tif")
    missing = next(safe.rglob("*_B05.tif"))
    missing.unlink()
    with pytest.raises(DataError, match="L1C product without band file.* B05") as err:
        open_s2(safe)
    assert err.value.path == str(safe)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK but no zip")
    with pytest.raises(DataError, match="cannot read the zip") as err:
        open_s2(broken)
    assert err.value.path == str(broken)


def test_stacked_inputs_are_checked(tmp_path):
    unnamed = write(tmp_path / "twelve.tif", np.ones((12, 8, 8), np.uint16))
    with pytest.raises(DataError, match="12 bands without band names") as err:
        open_s2(unnamed)
    assert err.value.path == str(unnamed)
    data = np.ones((13, 8, 8), np.float32)
    data[4, 2, 2] = np.nan
    nan = write(tmp_path / "nan.tif", data * 500)
    with open_s2(nan) as scene:
        scene.read(0, 2, ["B01"])
        with pytest.raises(DataError, match="NaN or Inf values in band B05") as err:
            scene.read(0, 8, ["B01", "B05"])
        assert err.value.path == str(nan)
    with pytest.raises(DataError, match="does not exist"):
        open_s2(tmp_path / "absent.tif")
    with pytest.raises(ValueError, match="units"):
        open_s2(nan, units="percent")
