"""Sen2_MTC_New reader: a generated copy reads back exactly, the split rule gives the published sizes on a
copy with the published tiles, and every bad file raises a DataError that names it."""

from __future__ import annotations

import numpy as np
import pytest

from crrf_jax.data import sen2_mtc as M
from crrf_jax.data.contract import DataError
from crrf_jax.data.sen12mscr import BadSampleLog

SIZE = 16


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sen2_mtc")
    ids = M.write_synthetic_sen2_mtc(root, images_per_tile=2, size=SIZE, seed=3)
    return root, ids


@pytest.fixture
def fresh(tmp_path):
    tiles = {"train": ("T09WWP_R071",), "test": ("T12TUR_R027",)}
    M.write_synthetic_sen2_mtc(tmp_path, tiles=tiles, images_per_tile=2, size=SIZE, seed=1)
    return tmp_path


def _touch_tile(root, tile, n_images):
    for k in range(n_images):
        sample = M.sample_paths(root, tile, f"{tile}_{k}")
        for path in (sample.s2, *sample.s2_cloudy):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def test_generated_copy_reads_back_exactly(copy):
    root, ids = copy
    assert set(ids) == set(M.SPLITS)
    n = 0
    for split in ("train", "val", "test"):  # the generator's order, which numbers the seeds
        samples = M.find_samples(root, split)
        assert [s.id for s in samples] == ids[split]
        for sample in samples:
            out = M.read_sample(sample)
            want = M.synthetic_sample(SIZE, seed=3 * 1_000_003 + n)
            n += 1
            assert out["id"] == sample.id and out["tile"] == sample.tile == sample.id.rsplit("_", 1)[0]
            assert out["s2"].dtype == np.float32 and out["s2_cloudy"].dtype == np.float32
            assert out["s2"].shape == (SIZE, SIZE, 4) and out["s2_cloudy"].shape == (3, SIZE, SIZE, 4)
            np.testing.assert_array_equal(out["s2"], want["s2"].astype(np.float32) / 10000)
            np.testing.assert_array_equal(out["s2_cloudy"], want["s2_cloudy"].astype(np.float32) / 10000)
            assert 0 <= out["s2_cloudy"].min() and out["s2_cloudy"].max() <= 1


def test_dates_come_back_in_index_order_and_differ(copy):
    root, _ = copy
    out = M.read_sample(M.find_samples(root, "val")[0])
    # The generator's dates have decreasing cloud cover, so the cloudy dates are distinct and darken.
    means = out["s2_cloudy"].mean(axis=(1, 2, 3))
    assert means[0] > means[1] > means[2] > out["s2"].mean() - 0.02


def test_band_selection(copy):
    root, _ = copy
    sample = M.find_samples(root, "test")[1]
    full = M.read_sample(sample)
    rgb = M.read_sample(sample, "rgb")
    np.testing.assert_array_equal(rgb["s2"], full["s2"][..., :3])
    picked = M.read_sample(sample, ["B08", 0])
    np.testing.assert_array_equal(picked["s2_cloudy"], full["s2_cloudy"][..., [3, 0]])
    for bad in (["B05"], [4], ["B04", "b04"]):
        with pytest.raises(ValueError):
            M.resolve_bands(bad)


def test_samples_ordered_by_split_file_then_image_number(tmp_path):
    (tmp_path / "train.txt").write_text("T2\nT1\n")
    _touch_tile(tmp_path, "T1", 3)
    _touch_tile(tmp_path, "T2", 12)
    ids = [s.id for s in M.find_samples(tmp_path, "train")]
    assert ids == [f"T2_{k}" for k in range(12)] + [f"T1_{k}" for k in range(3)]


def test_published_tiles_give_the_published_split_sizes(tmp_path):
    assert sum(M.TEST_TILES.values()) == M.PUBLISHED_SPLIT_SIZES["test"]
    assert sum(M.VAL_TILES.values()) == M.PUBLISHED_SPLIT_SIZES["val"]
    for split, tiles in (("val", M.VAL_TILES), ("test", M.TEST_TILES)):
        (tmp_path / f"{split}.txt").write_text("\n".join(tiles) + "\n")
        for tile, count in tiles.items():
            _touch_tile(tmp_path, tile, count)
        samples = M.find_samples(tmp_path, split)
        assert len(samples) == M.PUBLISHED_SPLIT_SIZES[split]
        assert len({s.id for s in samples}) == len(samples)
    assert not set(M.VAL_TILES) & set(M.TEST_TILES)


def _raises_naming(path, fn, *args, match=None, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(str(path)), str(info.value)
    return info.value


def test_listing_errors_name_the_file(fresh):
    sample = M.find_samples(fresh, "train")[0]
    sample.s2_cloudy[1].unlink()
    _raises_naming(sample.s2_cloudy[1], M.find_samples, fresh, "train", match="missing cloudy date 1")
    log = BadSampleLog()
    kept = M.find_samples(fresh, "train", on_error="skip", bad_samples=log)
    assert [s.id for s in kept] == ["T09WWP_R071_1"] and log.count == 1
    extra = fresh / "Sen2_MTC" / "T12TUR_R027" / "cloud" / "T12TUR_R027_0_3.tif"
    extra.touch()
    _raises_naming(extra, M.find_samples, fresh, "test", match="unexpected date index _3")
    extra.rename(extra.with_name("T12TUR_R027_1_01.tif"))
    _raises_naming(extra.with_name("T12TUR_R027_1_01.tif"), M.find_samples, fresh, "test", match="_01")
    _raises_naming(fresh / "val.txt", M.find_samples, fresh, "val", match="does not exist")
    (fresh / "val.txt").write_text("T09WWP_R071\nT09WWP_R071\n")
    _raises_naming(fresh / "val.txt", M.find_samples, fresh, "val", match="listed twice")
    (fresh / "val.txt").write_text("T99ABC_R000\n")
    _raises_naming(fresh / "Sen2_MTC" / "T99ABC_R000" / "cloudless", M.find_samples, fresh, "val")
    with pytest.raises(FileNotFoundError):
        M.find_samples(fresh / "nope", "train")


def test_reading_errors_name_the_file(fresh):
    sample = M.find_samples(fresh, "test")[0]
    good = M.read_sample(sample)
    dn = np.full((SIZE, SIZE, 4), 1000, np.uint16)
    with_nan = dn.astype(np.float32)
    with_nan[3, 5, 2] = np.nan
    cases = [
        (sample.s2_cloudy[2], dn[..., :3], "must have 4 bands"),
        (sample.s2_cloudy[0], np.full((SIZE, SIZE + 2, 4), 1000, np.uint16), "not on the grid.*size"),
        (sample.s2_cloudy[1], dn.astype(np.uint8), "must be uint16"),
        (sample.s2, with_nan, "1 non-finite"),
    ]
    for path, array, match in cases:
        original = path.read_bytes()
        M._write_tif(path, array)
        _raises_naming(path, M.read_sample, sample, match=match)
        path.write_bytes(original)
    garbage = sample.s2_cloudy[1]
    garbage.write_bytes(b"not a tiff at all")
    _raises_naming(garbage, M.read_sample, sample, match="cannot open")
    log = BadSampleLog()
    assert M.read_sample_or_none(sample, on_error="skip", bad_samples=log) is None and log.count == 1
    sample.s2.unlink()
    _raises_naming(sample.s2, M.read_sample, sample, match="does not exist")
    other = M.find_samples(fresh, "train")[1]
    assert M.read_sample(other)["id"] == other.id and good["id"] == sample.id


def test_float_dn_files_are_scaled_and_clipped(fresh):
    sample = M.find_samples(fresh, "train")[0]
    dn = np.linspace(-50, 12000, SIZE * SIZE * 4, dtype=np.float32).reshape(SIZE, SIZE, 4)
    for path in (sample.s2, *sample.s2_cloudy):
        M._write_tif(path, dn)
    out = M.read_sample(sample)
    np.testing.assert_array_equal(out["s2"], np.clip(dn, 0, 10000) / 10000)
    assert out["s2_cloudy"].min() == 0 and out["s2_cloudy"].max() == 1
