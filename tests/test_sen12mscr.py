"""SEN12MS-CR reader: splits (exact vs legacy), real-sample reads, validation errors."""

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from crrf_jax.data import contract
from crrf_jax.data import sen12mscr as sd
from crrf_jax.data.contract import DataError

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sen12mscr_sample"
FALL = "ROIs1970_fall_139_p839"
WINTER = "ROIs2017_winter_112_p797"


@pytest.fixture(scope="module")
def sample_root() -> Path:
    if not (SAMPLE / "ROIs1970_fall_s1").is_dir():
        pytest.skip(f"real SEN12MS-CR sample not found at {SAMPLE}")
    return SAMPLE


# ---------------------------------------------------------------------------------------------------- helpers


def write_tif(path: Path, data: np.ndarray, *, transform=None, crs="EPSG:32631") -> Path:
    """Write (C, H, W) data as a GeoTIFF with data's dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = data.shape
    transform = transform or from_origin(500000.0, 5600000.0, 10.0, 10.0)
    profile = dict(driver="GTiff", height=h, width=w, count=c, dtype=data.dtype, crs=crs, transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def good_triplet(root: Path, season="ROIs1158_spring", scene=1, patch=5, size=16, seed=0) -> sd.Triplet:
    """A valid small triplet on disk; returns its Triplet."""
    rng = np.random.default_rng(seed)
    t = sd.make_triplet(root, season, scene, patch)
    write_tif(t.s1, rng.uniform(-30, 3, (2, size, size)).astype(np.float32))
    write_tif(t.s2, rng.integers(0, 12000, (13, size, size)).astype(np.uint16))
    write_tif(t.s2_cloudy, rng.integers(0, 12000, (13, size, size)).astype(np.uint16))
    return t


def touch_triplet(root: Path, season: str, scene: int, patch: int = 1) -> None:
    t = sd.make_triplet(root, season, scene, patch)
    for p in (t.s1, t.s2, t.s2_cloudy):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


def assert_names(err: pytest.ExceptionInfo, path: Path) -> None:
    assert str(err.value).startswith(str(path)), str(err.value)
    assert err.value.path == str(path)


# ----------------------------------------------------------------------------------------------------- splits


def test_split_lists_match_design():
    assert sum(map(len, sd.TEST_ROIS.values())) == 10
    assert sum(map(len, sd.VAL_ROIS.values())) == 10
    assert sd.split_of("ROIs1158_spring", "s1_106") == "test"
    assert sd.split_of("ROIs1970_fall", "s1_65") == "val"
    assert sd.split_of("ROIs1158_spring", "s1_1") == "train"
    for season in sd.SEASONS:
        assert not sd.TEST_ROIS[season] & sd.VAL_ROIS[season]
        assert not sd.LEGACY_TRAIN_ROIS[season] & (sd.TEST_ROIS[season] | sd.VAL_ROIS[season])


def test_legacy_leaks_exactly_six_test_rois():
    leaked = {
        (season, roi)
        for season, rois in sd.TEST_ROIS.items()
        for roi in rois
        if sd.in_split(sd.make_triplet("/d", season, int(roi[3:]), 1), "train", "legacy")
    }
    assert leaked == {
        ("ROIs1158_spring", "s1_106"),
        ("ROIs1158_spring", "s1_123"),
        ("ROIs1158_spring", "s1_140"),
        ("ROIs1868_summer", "s1_119"),
        ("ROIs1868_summer", "s1_73"),
        ("ROIs1970_fall", "s1_139"),
    }


def test_exact_and_legacy_splits_on_fake_layout(tmp_path):
    for season, scene in [
        ("ROIs1158_spring", 1),
        ("ROIs1158_spring", 106),
        ("ROIs1158_spring", 17),
        ("ROIs1158_spring", 2),  # on no UnCRtainTS list: exact train, dropped by legacy
        ("ROIs1868_summer", 19),
        ("ROIs2017_winter", 108),
    ]:
        touch_triplet(tmp_path, season, scene)
    touch_triplet(tmp_path, "ROIs1158_spring", 106, patch=2)
    (tmp_path / "ROIs1158_spring_s1" / "s1_1" / "notes.txt").write_text("ignored")

    def ids(split, protocol="exact"):
        return [t.id for t in sd.find_triplets(tmp_path, split, protocol)]

    assert ids("test") == ["ROIs1158_spring_106_p1", "ROIs1158_spring_106_p2", "ROIs2017_winter_108_p1"]
    assert ids("val") == ["ROIs1158_spring_17_p1", "ROIs1868_summer_19_p1"]
    assert ids("train") == ["ROIs1158_spring_1_p1", "ROIs1158_spring_2_p1"]
    assert len(ids("all")) == 7 and ids("all") == sorted(ids("all"))
    assert set(ids("train")) | set(ids("val")) | set(ids("test")) == set(ids("all"))

    legacy_train = ids("train", "legacy")
    assert "ROIs1158_spring_106_p1" in legacy_train  # the leak: 's1_1' is a substring of 's1_106'
    assert "ROIs1158_spring_17_p1" in legacy_train  # val leaks too
    assert "ROIs1158_spring_2_p1" not in legacy_train
    assert "ROIs2017_winter_108_p1" not in legacy_train
    assert ids("test", "legacy") == ids("test")

    t = sd.find_triplets(tmp_path, "test")[0]
    assert (t.season, t.roi, t.patch, t.scene) == ("ROIs1158_spring", "s1_106", 1, 106)
    cloudy = "ROIs1158_spring_s2_cloudy/s2_cloudy_106/ROIs1158_spring_s2_cloudy_106_p1.tif"
    assert t.s2_cloudy == tmp_path / cloudy


def test_find_triplets_errors(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd.find_triplets(tmp_path / "nope")
    with pytest.raises(ValueError, match="no SEN12MS-CR triplets"):
        sd.find_triplets(tmp_path)
    touch_triplet(tmp_path, "ROIs1158_spring", 1)
    with pytest.raises(sd.EmptySplitError, match="split 'test'.*holds no triplet"):
        sd.find_triplets(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        sd.find_triplets(tmp_path, "training")
    with pytest.raises(ValueError, match="protocol must be one of"):
        sd.find_triplets(tmp_path, protocol="fuzzy")

    touch_triplet(tmp_path, "ROIs1158_spring", 3)
    missing = sd.make_triplet(tmp_path, "ROIs1158_spring", 3, 1).s2_cloudy
    missing.unlink()
    with pytest.raises(DataError, match="missing partner") as err:
        sd.find_triplets(tmp_path)
    assert_names(err, missing)

    log = sd.BadSampleLog()
    with caplog.at_level(logging.WARNING):
        found = sd.find_triplets(tmp_path, on_error="skip", bad_samples=log)
    assert [t.id for t in found] == ["ROIs1158_spring_1_p1"]
    assert log.count == 1 and log.entries[0].path == str(missing)
    assert "ROIs1158_spring_3_p1" in caplog.text


# ------------------------------------------------------------------------------------------------ real sample


def test_real_sample_splits(sample_root):
    assert [t.id for t in sd.find_triplets(sample_root)] == [FALL, WINTER]
    assert [t.id for t in sd.find_triplets(sample_root, "test")] == [FALL]
    assert [t.id for t in sd.find_triplets(sample_root, "train")] == [WINTER]
    legacy_train = [t.id for t in sd.find_triplets(sample_root, "train", "legacy")]
    assert legacy_train == [FALL, WINTER]  # test ROI fall s1_139 leaks into legacy train


def test_real_sample_read(sample_root):
    for t in sd.find_triplets(sample_root):
        x = sd.read_triplet(t)
        assert x["id"] == t.id
        assert x["s1"].shape == (256, 256, 2) and x["s2"].shape == x["s2_cloudy"].shape == (256, 256, 13)
        for key in ("s1", "s2", "s2_cloudy"):
            assert x[key].dtype == np.float32
            assert 0.0 <= x[key].min() and x[key].max() <= 1.0
        with rasterio.open(t.s2_cloudy) as ds:
            raw = ds.read()
            assert x["crs"] == ds.crs and x["crs"].to_epsg() in (32650, 32631)
            assert x["transform"] == ds.transform and x["transform"].a == 10.0
        np.testing.assert_array_equal(x["s2_cloudy"], np.moveaxis(raw, 0, -1).astype(np.float32) / 10000)
        with rasterio.open(t.s1) as ds:
            db = np.moveaxis(ds.read(), 0, -1)
        np.testing.assert_allclose(x["s1"], (np.clip(db, -25, 0) + 25) / 25, atol=1e-6)
        assert x["s2"].mean() > 0.01  # real reflectances, not zeros


def test_real_sample_window_and_bands(sample_root):
    t = sd.find_triplets(sample_root, "test")[0]
    full = sd.read_triplet(t)
    win = Window(col_off=40, row_off=100, width=64, height=32)
    part = sd.read_triplet(t, bands="rgb", window=win)
    assert part["s2"].shape == (32, 64, 3) and part["s1"].shape == (32, 64, 2)
    np.testing.assert_array_equal(part["s2"], full["s2"][100:132, 40:104][..., [3, 2, 1]])
    np.testing.assert_array_equal(part["s1"], full["s1"][100:132, 40:104])
    ft = full["transform"]
    assert part["transform"].c == pytest.approx(ft.c + 40 * ft.a)
    assert part["transform"].f == pytest.approx(ft.f + 100 * ft.e)
    assert part["crs"] == full["crs"]
    with pytest.raises(ValueError, match="not inside"):
        sd.read_triplet(t, window=Window(250, 0, 16, 16))


# -------------------------------------------------------------------------------------------------- bad files


def test_good_synthetic_triplet_reads(tmp_path):
    t = good_triplet(tmp_path)
    x = sd.read_triplet(t, bands=["B02"])
    assert x["s2"].shape == (16, 16, 1) and x["s1"].shape == (16, 16, 2)


def _corrupt(case: str, t: sd.Triplet, rng) -> Path:
    """Break one file of a good triplet; returns the path the error must name."""
    if case == "missing":
        t.s2.unlink()
        return t.s2
    if case == "not_tiff":
        t.s1.write_bytes(b"this is not a tiff at all" * 10)
        return t.s1
    if case == "truncated":
        size = t.s2_cloudy.stat().st_size
        with open(t.s2_cloudy, "r+b") as f:
            f.truncate(size // 2)
        return t.s2_cloudy
    if case == "band_count":
        write_tif(t.s2, rng.integers(0, 9000, (12, 16, 16)).astype(np.uint16))
        return t.s2
    if case == "size":
        write_tif(t.s1, rng.uniform(-20, 0, (2, 16, 15)).astype(np.float32))
        return t.s1
    if case == "grid":
        shifted = from_origin(500020.0, 5600000.0, 10.0, 10.0)
        write_tif(t.s2_cloudy, rng.integers(0, 9000, (13, 16, 16)).astype(np.uint16), transform=shifted)
        return t.s2_cloudy
    if case == "crs":
        write_tif(t.s1, rng.uniform(-20, 0, (2, 16, 16)).astype(np.float32), crs="EPSG:32632")
        return t.s1
    if case == "dtype_s2":
        write_tif(t.s2, rng.integers(0, 255, (13, 16, 16)).astype(np.uint8))
        return t.s2
    if case == "dtype_s1":
        write_tif(t.s1, rng.integers(0, 255, (2, 16, 16)).astype(np.uint16))
        return t.s1
    if case == "nan_s2":
        data = rng.uniform(0, 9000, (13, 16, 16)).astype(np.float32)
        data[4, 3, 3] = np.nan
        write_tif(t.s2_cloudy, data)
        return t.s2_cloudy
    if case == "nan_s1":
        data = rng.uniform(-20, 0, (2, 16, 16)).astype(np.float32)
        data[:, :4, :] = np.nan  # 25 % > 10 %
        write_tif(t.s1, data)
        return t.s1
    raise AssertionError(case)


BAD_CASES = {
    "missing": "does not exist",
    "not_tiff": "cannot open",
    "truncated": "cannot",
    "band_count": "must have 13 bands, found 12",
    "size": "size 16x15 vs",
    "grid": "transform",
    "crs": "CRS",
    "dtype_s2": "must be uint16",
    "dtype_s1": "must be float32",
    "nan_s2": "non-finite",
    "nan_s1": "25.0% of Sentinel-1 values are NaN",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_file_raises_data_error_naming_it(tmp_path, case):
    t = good_triplet(tmp_path)
    bad_path = _corrupt(case, t, np.random.default_rng(1))
    with pytest.raises(DataError, match=BAD_CASES[case]) as err:
        sd.read_triplet(t)
    assert_names(err, bad_path)


def test_s1_nan_policy_fills_few(tmp_path):
    t = good_triplet(tmp_path)
    data = np.full((2, 16, 16), -10.0, np.float32)
    data[0, 0, :5] = np.nan
    data[1, 2, 2] = -np.inf
    data[1, 3, 3] = np.inf
    write_tif(t.s1, data)
    s1 = sd.read_triplet(t)["s1"]
    assert np.isfinite(s1).all()
    assert (s1[0, :5, 0] == contract.S1_NONFINITE_FILL).all() and s1[2, 2, 1] == 0.0 and s1[3, 3, 1] == 0.0
    assert s1[5, 5, 0] == pytest.approx(0.6)
    with pytest.raises(DataError, match="NaN/Inf"):
        sd.read_triplet(t, s1_max_nonfinite=0.001)


def test_skip_mode_logs_and_counts(tmp_path, caplog):
    good = good_triplet(tmp_path, scene=1)
    bad1 = good_triplet(tmp_path, scene=2)
    bad2 = good_triplet(tmp_path, scene=3)
    _corrupt("truncated", bad1, np.random.default_rng(0))
    _corrupt("band_count", bad2, np.random.default_rng(0))
    log = sd.BadSampleLog()
    with caplog.at_level(logging.WARNING, logger="crrf_jax.data.sen12mscr"):
        out = [sd.read_triplet_or_none(t, on_error="skip", bad_samples=log) for t in (good, bad1, bad2)]
    assert out[0] is not None and out[0]["id"] == good.id and out[1] is None and out[2] is None
    assert log.count == 2
    assert [(e.id, e.path) for e in log.entries] == [(bad1.id, str(bad1.s2_cloudy)), (bad2.id, str(bad2.s2))]
    assert "must have 13 bands" in log.entries[1].reason
    ours = [r for r in caplog.records if r.name == "crrf_jax.data.sen12mscr" and r.levelno == logging.WARNING]
    assert len(ours) == 2 and bad1.id in ours[0].getMessage()
    assert "2 bad sample(s)" in log.summary()
    with pytest.raises(DataError):
        sd.read_triplet_or_none(bad1, on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        sd.read_triplet_or_none(good, on_error="ignore")
