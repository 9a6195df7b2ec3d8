"""SEN12MS-CR-TS reader: split tables and sizes, date samplers, exact read-back of a generated copy, and
errors that name the file."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from crrf_jax.data import contract
from crrf_jax.data import sen12mscr_ts as ts
from crrf_jax.data.contract import DataError

ROI = ("ROIs1868", 36)  # a train ROI


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ts")
    ts.write_synthetic_sen12mscr_ts(root)
    return root


@pytest.fixture(scope="module")
def small_master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ts_small")
    ts.write_synthetic_sen12mscr_ts(root, rois=[ROI], n_patches=1, n_dates=4, size=16, seed=3)
    return root


@pytest.fixture
def small(small_master, tmp_path) -> Path:
    """A fresh copy of one ROI, one patch (number 0), 4 dates, to break."""
    return Path(shutil.copytree(small_master, tmp_path / "copy"))


def only_series(root: Path) -> ts.Series:
    (series,) = ts.find_series(root)
    return series


def assert_names(err: pytest.ExceptionInfo, path: Path | str) -> None:
    assert isinstance(err.value, DataError)
    assert err.value.path == str(path), str(err.value)
    assert str(err.value).startswith(str(path))


def rewrite(path: Path, data: np.ndarray) -> None:
    """Replace the GeoTIFF at path by (C, H, W) data, keeping its CRS and transform."""
    with rasterio.open(path) as src:
        crs, transform = src.crs, src.transform
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", count=c, height=h, width=w, dtype=data.dtype, crs=crs,
                       transform=transform) as dst:
        dst.write(data)


# ----------------------------------------------------------------------------------------------------- splits


def test_split_tables_are_the_published_ones():
    assert {split: len(ts.rois_of(split)) for split in ts.SPLITS} == ts.N_ROIS == {
        "all": 53, "train": 35, "val": 5, "test": 13}
    for table in (ts.TEST_ROIS, ts.VAL_ROIS):
        assert all(table[region] <= ts.ROIS[region] for region in table)
    assert not set(ts.rois_of("test")) & set(ts.rois_of("val"))
    assert ts.split_of("ROIs1868", 100) == "test"
    assert ts.split_of("ROIs2017", 117) == "val"
    assert ts.split_of("ROIs1970", 21) == "train"
    assert ts.split_of("ROIs1970", 22) is None  # a SEN12MS-CR scene, not one of the 53


def test_split_sizes_on_a_generated_copy_of_every_roi(tmp_path):
    ts.write_synthetic_sen12mscr_ts(tmp_path, rois=ts.rois_of("all"), n_patches=1, n_dates=2, size=8)
    unlisted = [("ROIs1970", 22)]  # a SEN12MS-CR scene number, not one of the 53: ignored
    ts.write_synthetic_sen12mscr_ts(tmp_path, rois=unlisted, n_patches=1, n_dates=2, size=8)
    found = {split: ts.find_series(tmp_path, split) for split in ts.SPLITS}
    assert {split: len(series) for split, series in found.items()} == ts.N_ROIS
    assert [(s.region, s.roi) for s in found["test"]] == ts.rois_of("test")
    assert {s.id for s in found["all"]} == {s.id for split in ("train", "val", "test") for s in found[split]}


def test_overlap_with_sen12mscr_splits():
    assert ts.sen12mscr_overlap() == {
        "test in sen12mscr train": [("ROIs1868", 100), ("ROIs1868", 142), ("ROIs1970", 20), ("ROIs1970", 132),
                                    ("ROIs2017", 32), ("ROIs2017", 103), ("ROIs2017", 140)],
        "test in sen12mscr train (legacy)": [("ROIs1868", 100)],
        "val in sen12mscr train": [("ROIs2017", 117)],
        "train in sen12mscr val": [("ROIs2017", 130)],
    }


def test_find_series_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        ts.find_series(tmp_path, "holdout")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ts.find_series(tmp_path / "absent")
    with pytest.raises(ValueError, match="no SEN12MS-CR-TS patch"):
        ts.find_series(tmp_path)


# ---------------------------------------------------------------------------------------------- date samplers


def test_fixed_sampler_reproduces_uncrtaints():
    cov = [0.5, 0.2, 0.0, 0.9, 0.0, 0.3]
    # defaults (0, 1): the first three dates, the target (earliest clear, 2) among them
    assert ts.select_dates_fixed(cov) == ts.DateChoice((0, 1, 2), 2, True)
    assert ts.select_dates_fixed(cov, exclude_target=True) == ts.DateChoice((0, 1, 3), 2, True)
    assert ts.select_dates_fixed(cov, 2, min_cov=0.1, max_cov=0.6) == ts.DateChoice((0, 1), 2, True)
    # too few dates in range: the first dates other than the target, and no match
    assert ts.select_dates_fixed(cov, 3, min_cov=0.8) == ts.DateChoice((0, 1, 3), 2, False)
    # a target that is not clear is no match either
    assert ts.select_dates_fixed([0.5, 0.2, 0.01, 0.9]).match is False
    with pytest.raises(ValueError, match="n_inputs"):
        ts.select_dates_fixed(cov, 6)


def test_random_sampler_windows():
    rng = np.random.default_rng(0)
    one_clear = lambda t: [0.0 if i == t else 0.5 for i in range(30)]
    assert ts.select_dates_random(one_clear(0), 3, rng) == ts.DateChoice((1, 2, 3), 0, True)
    assert ts.select_dates_random(one_clear(29), 3, rng) == ts.DateChoice((26, 27, 28), 29, True)
    # windows of 4 dates holding 10 start at 7, 8, 9, 10: the middle one (index 2) starts at 9
    assert ts.select_dates_random(one_clear(10), 3, rng) == ts.DateChoice((9, 11, 12), 10, True)
    cloudy = [0.4, 0.3, 0.2, 0.6, 0.5]  # nothing clear: the least cloudy
    assert ts.select_dates_random(cloudy, 2, rng).target == 2
    two_clear = [0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0]
    targets = {ts.select_dates_random(two_clear, 2, np.random.default_rng(s)).target for s in range(20)}
    assert targets == {0, 6}


# ---------------------------------------------------------------------------------------------------- reading


def test_generated_copy_reads_back_exactly(generated):
    series = ts.find_series(generated, "train")
    assert [s.id for s in series] == ["ROIs1868_36_p0", "ROIs1868_36_p5"]
    assert [len(ts.find_series(generated, split)) for split in ("val", "test", "all")] == [2, 2, 6]
    s = series[1]
    truth = ts.synthetic_series(s.region, s.roi, s.patch, n_dates=6, size=16, seed=0)
    assert s.s2_dates == truth["s2_dates"] and s.s1_dates == truth["s1_dates"]
    target = truth["clear"]
    inputs = [t for t in range(6) if t != target][1:4]
    sample = ts.read_series(s, inputs, target)
    np.testing.assert_array_equal(sample["s2_cloudy"], contract.normalize_s2(truth["s2"][inputs]))
    np.testing.assert_array_equal(sample["s1"], contract.normalize_s1_filled(truth["s1"][inputs]))
    np.testing.assert_array_equal(sample["s2"], contract.normalize_s2(truth["s2"][target]))
    assert sample["s2_cloudy"].shape == (3, 16, 16, 13) and sample["s1"].shape == (3, 16, 16, 2)
    assert {sample[k].dtype for k in ("s2_cloudy", "s1", "s2")} == {np.dtype(np.float32)}
    assert sample["dates"] == tuple(truth["s2_dates"][t].isoformat() for t in inputs)
    assert sample["s1_dates"] == tuple(truth["s1_dates"][t].isoformat() for t in inputs)
    assert sample["target_date"] == truth["s2_dates"][target].isoformat()
    np.testing.assert_array_equal(sample["days"], [(truth["s2_dates"][t] - datetime.date(2014, 4, 3)).days
                                                   for t in inputs])
    assert sample["input_index"].tolist() == inputs and sample["target_index"] == target
    assert sample["id"] == "ROIs1868_36_p5"
    rgb = ts.read_series(s, inputs, target, bands="rgb")
    np.testing.assert_array_equal(rgb["s2_cloudy"], sample["s2_cloudy"][..., list(contract.RGB)])


def test_read_sample_targets_the_clear_date_by_s2cloudless_coverage(generated):
    s = ts.find_series(generated, "test")[0]
    truth = ts.synthetic_series(s.region, s.roi, s.patch, n_dates=6, size=16, seed=0)
    coverage = ts.cloud_coverage(s)
    assert coverage[truth["clear"]] == 0.0 and min(np.delete(coverage, truth["clear"])) > 0.1
    sample = ts.read_sample(s, n_inputs=3, coverage=coverage, exclude_target=True)
    assert sample["target_index"] == truth["clear"] and sample["match"] is True
    assert sample["input_index"].tolist() == [t for t in range(6) if t != truth["clear"]][:3]
    np.testing.assert_allclose(sample["coverage"], [coverage[t] for t in sample["input_index"]])
    rand = ts.read_sample(s, 2, coverage=coverage, sampler="random", rng=np.random.default_rng(0))
    assert rand["target_index"] == truth["clear"] and len(rand["input_index"]) == 2


def test_read_series_arguments(small):
    s = only_series(small)
    for inputs, target in (([2, 1], 0), ([0, 4], 1), ([], 0), ([0, 1], 4)):
        with pytest.raises(ValueError, match="strictly increasing"):
            ts.read_series(s, inputs, target)
    with pytest.raises(ValueError, match="needs rng"):
        ts.read_sample(s, 2, coverage=[0.1] * 4, sampler="random")


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_s1_partner_names_the_expected_file(small):
    s = only_series(small)
    s.s1[2].unlink()
    with pytest.raises(DataError, match="missing S1 file of date 2") as err:
        ts.find_series(small)
    assert_names(err, ts.series_file(small, "s1", *ROI, 2, "*", 0))
    assert str(s.s2[2]) in str(err.value)  # and its S2 partner


def test_missing_s2_date_names_the_expected_file(small):
    s = only_series(small)
    s.s2[1].unlink()
    with pytest.raises(DataError) as err:
        ts.find_series(small)
    assert_names(err, ts.series_file(small, "s2", *ROI, 1, "*", 0))


def test_date_folder_gap_and_unpaired_folders(small):
    s = only_series(small)
    shutil.rmtree(s.s2[1].parent)
    with pytest.raises(DataError, match="date folder missing") as err:
        ts.find_series(small)
    assert_names(err, s.s2[1].parent)


def test_s1_with_fewer_date_folders(small):
    s = only_series(small)
    shutil.rmtree(s.s1[3].parent)
    with pytest.raises(DataError, match="without a partner") as err:
        ts.find_series(small)
    assert_names(err, s.s2[3].parent)


def test_dates_out_of_order_name_the_later_file(small):
    s = only_series(small)
    early = s.s2_dates[0] - datetime.timedelta(days=1)
    moved = ts.series_file(small, "s2", *ROI, 2, early, 0)
    s.s2[2].rename(moved)
    with pytest.raises(DataError, match="is not after") as err:
        ts.find_series(small)
    assert_names(err, moved)


def test_unparseable_date_names_the_file(small):
    s = only_series(small)
    bad = ts.series_file(small, "s1", *ROI, 1, "2018-13-40", 0)
    s.s1[1].rename(bad)
    with pytest.raises(DataError, match="not YYYY-MM-DD") as err:
        ts.find_series(small)
    assert_names(err, bad)


def test_other_file_names_are_ignored(small):
    s = only_series(small)
    (s.s2[0].parent / "notes.tif").write_text("not a patch")
    (s.s2[0].parent / s.s2[0].name.replace("ROIs1868", "ROIs1970")).write_text("another ROI's name")
    assert only_series(small) == s


@pytest.mark.parametrize(
    "which, data, message",
    [
        ("s2", np.ones((12, 16, 16), np.uint16), "must have 13 bands, found 12"),
        ("s1", np.ones((3, 16, 16), np.float32), "must have 2 bands, found 3"),
        ("s1", np.ones((2, 16, 8), np.float32), "size 16x8 vs 16x16"),
        ("s2", np.ones((13, 8, 16), np.uint16), "size 8x16 vs 16x16"),
        ("s2", np.ones((13, 16, 16), np.int32), "must be uint16 or float32 or float64, found int32"),
        ("s2", np.full((13, 16, 16), np.nan, np.float32), "non-finite"),
        ("s1", np.full((2, 16, 16), np.nan, np.float32), "NaN/Inf"),
    ],
)
def test_bad_input_files_name_the_file(small, which, data, message):
    s = only_series(small)
    path = getattr(s, which)[1]
    rewrite(path, data)
    with pytest.raises(DataError, match=message) as err:
        ts.read_series(s, [0, 1], 3)
    assert_names(err, path)


def test_unreadable_and_wrong_target_files_name_the_file(small):
    s = only_series(small)
    s.s2[3].write_bytes(b"II*\x00 truncated")
    with pytest.raises(DataError, match="cannot open") as err:
        ts.read_series(s, [0, 1], 3)
    assert_names(err, s.s2[3])
    with pytest.raises(DataError, match="cannot open") as err:
        ts.cloud_coverage(s, [3])
    assert_names(err, s.s2[3])


def test_input_off_the_target_grid_names_the_file(small):
    s = only_series(small)
    with rasterio.open(s.s1[0]) as src:
        data, crs, transform = src.read(), src.crs, src.transform
    shifted = transform @ rasterio.Affine.translation(0.5, 0.0)
    with rasterio.open(s.s1[0], "w", driver="GTiff", count=2, height=16, width=16, dtype="float32", crs=crs,
                       transform=shifted) as dst:
        dst.write(data)
    with pytest.raises(DataError, match="not on the grid") as err:
        ts.read_series(s, [0, 1], 3)
    assert_names(err, s.s1[0])
