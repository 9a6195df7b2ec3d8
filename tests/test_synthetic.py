"""Synthetic SEN12MS-CR scenes: layout, georeferencing, determinism and physical plausibility."""

from pathlib import Path

import numpy as np
import pytest
import rasterio

from crrf_jax.data import cloudprob, contract, sen12mscr, synthetic

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sen12mscr_sample"
WATER, VEGETATION, SOIL, URBAN, SNOW = range(5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    ids = synthetic.write_synthetic_dataset(root, n_scenes=8, size=32, seed=3)
    return root, ids


def test_layout_and_splits(dataset):
    root, ids = dataset
    assert len(ids) == len(set(ids)) == 8
    assert (root / "ROIs1158_spring_s1" / "s1_106" / "ROIs1158_spring_s1_106_p30.tif").is_file()
    assert (
        root / "ROIs1158_spring_s2_cloudy" / "s2_cloudy_106" / "ROIs1158_spring_s2_cloudy_106_p30.tif"
    ).is_file()
    found = sen12mscr.find_triplets(root)
    assert sorted(ids) == [t.id for t in found]
    counts = {split: len(sen12mscr.find_triplets(root, split)) for split in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 1, "test": 1}
    assert [t.id for t in sen12mscr.find_triplets(root, "test")] == ["ROIs1158_spring_106_p30"]
    assert [t.id for t in sen12mscr.find_triplets(root, "val")] == ["ROIs2017_winter_22_p30"]


def test_files_are_georeferenced_like_sen12mscr(dataset):
    root, _ = dataset
    triplet = sen12mscr.find_triplets(root, "test")[0]
    expected = {"s1": ("float32", 2), "s2": ("uint16", 13), "s2_cloudy": ("uint16", 13)}
    for kind, (dtype, count) in expected.items():
        with rasterio.open(getattr(triplet, kind)) as f:
            assert (f.dtypes[0], f.count, f.shape) == (dtype, count, (32, 32))
            epsg = f.crs.to_epsg()
            assert 32601 <= epsg <= 32660, f"not a UTM north zone: {f.crs}"
            assert f.res == (10.0, 10.0)
    sample = sen12mscr.read_triplet(triplet)  # passes the reader's validation (same grid, dtypes, finite)
    assert sample["s2"].shape == (32, 32, 13) and sample["s1"].shape == (32, 32, 2)


def test_deterministic_given_seed(tmp_path):
    a = synthetic.write_synthetic_dataset(tmp_path / "a", n_scenes=3, size=24, seed=5)
    b = synthetic.write_synthetic_dataset(tmp_path / "b", n_scenes=3, size=24, seed=5)
    c = synthetic.write_synthetic_dataset(tmp_path / "c", n_scenes=3, size=24, seed=6)
    assert a == b == c
    for t_a, t_b, t_c in zip(*(sen12mscr.find_triplets(tmp_path / d) for d in "abc"), strict=True):
        s_a, s_b, s_c = (sen12mscr.read_triplet(t) for t in (t_a, t_b, t_c))
        for key in ("s1", "s2", "s2_cloudy"):
            assert np.array_equal(s_a[key], s_b[key])
            assert not np.array_equal(s_a[key], s_c[key])


def test_clouds_bright_thin_cirrus_and_shadows():
    scene = synthetic.synthetic_scene(96, seed=11, cloud_cover=0.4)
    clear, cloudy = scene["s2"].astype(np.float32), scene["s2_cloudy"].astype(np.float32)
    thick = scene["thick"] > 0.95
    free = (scene["thick"] == 0) & (scene["thin"] < 0.01) & (scene["shadow"] == 0)
    assert 0.2 < thick.mean() < 0.6 and free.mean() > 0.1
    visible = slice(1, 4)  # B02..B04
    assert cloudy[thick][:, visible].mean() > 6000
    assert cloudy[thick][:, visible].mean() > 2.5 * clear[thick][:, visible].mean()
    assert cloudy[thick][:, 11].mean() > 4000  # clouds stay bright in SWIR (B11), unlike snow
    # Cloud-free pixels: the same ground on another date (small radiometric change only).
    ratio = cloudy[free].mean(0) / clear[free].mean(0)
    assert np.all(np.abs(ratio[[1, 2, 3, 7]] - 1) < 0.06)
    thin = (scene["thin"] > 0.2) & (scene["thick"] == 0)
    assert thin.any() and cloudy[thin][:, 10].mean() > 5 * cloudy[free][:, 10].mean()  # cirrus in B10
    shadow = (scene["shadow"] > 0.5) & (scene["thick"] == 0) & (scene["thin"] < 0.01)
    assert shadow.any() and (cloudy[shadow][:, 7] < 0.7 * clear[shadow][:, 7]).mean() > 0.9


def test_sar_follows_land_cover_not_clouds():
    a = synthetic.synthetic_scene(96, seed=4, season="ROIs2017_winter", cloud_cover=0.1)
    b = synthetic.synthetic_scene(96, seed=4, season="ROIs2017_winter", cloud_cover=0.8)
    assert np.array_equal(a["s1"], b["s1"]) and np.array_equal(a["s2"], b["s2"])
    assert not np.array_equal(a["s2_cloudy"], b["s2_cloudy"])
    cover, vv, vh = a["land_cover"], a["s1"][..., 0], a["s1"][..., 1]
    means = {c: vv[cover == c].mean() for c in np.unique(cover)}
    assert WATER in means and URBAN in means and VEGETATION in means
    assert means[WATER] < -17 and means[WATER] < means[VEGETATION] < means[URBAN]
    assert vh.mean() < vv.mean() - 4
    assert vv[cover == VEGETATION].std() > 1.5  # speckle


def test_s2cloudless_sees_synthetic_clouds():
    scene = synthetic.synthetic_scene(64, seed=2, season="ROIs2017_winter", cloud_cover=0.5)
    images = np.stack([scene["s2_cloudy"], scene["s2"]]).astype(np.float32) / 10000
    prob = cloudprob.cloud_probability(images)[..., 0]
    thick, free = scene["thick"] > 0.9, (scene["thick"] == 0) & (scene["thin"] < 0.01)
    assert prob[0][thick].mean() > 0.8
    assert prob[0][free].mean() < 0.3
    assert prob[1].mean() < 0.3  # the clear image, snow included, is not taken for cloud


def test_big_scene_and_cli(tmp_path):
    paths = synthetic.write_synthetic_scene(tmp_path / "scene", height=50, width=70, seed=1)
    for kind, count in (("s1", 2), ("s2", 13), ("s2_cloudy", 13)):
        with rasterio.open(paths[kind]) as f:
            assert (f.count, f.height, f.width) == (count, 50, 70) and f.crs.is_projected
    synthetic.main(["--root", str(tmp_path / "cli"), "--n", "2", "--size", "16"])
    assert len(sen12mscr.find_triplets(tmp_path / "cli")) == 2
    with pytest.raises(ValueError, match="too small"):
        synthetic.synthetic_scene(4)


def test_statistics_resemble_the_real_sample():
    if not SAMPLE.is_dir():
        pytest.skip(f"real SEN12MS-CR sample not found at {SAMPLE}")
    real = [sen12mscr.read_triplet(t) for t in sen12mscr.find_triplets(SAMPLE)]
    fake = [synthetic.synthetic_scene(64, seed=s, cloud_cover=0.0) for s in range(3)]
    real_s2 = np.median(np.concatenate([r["s2"].reshape(-1, 13) for r in real]), axis=0) * 10000
    fake_s2 = np.median(np.concatenate([f["s2"].reshape(-1, 13) for f in fake]), axis=0).astype(np.float64)
    bands = [b for b in range(13) if b != 10]  # B10 is near zero in both
    assert np.all((fake_s2[bands] > real_s2[bands] / 3) & (fake_s2[bands] < real_s2[bands] * 3))
    real_vv = np.median(np.concatenate([contract.denormalize_s1(r["s1"][..., 0]).ravel() for r in real]))
    fake_vv = np.median(np.concatenate([f["s1"][..., 0].ravel() for f in fake]))
    assert abs(real_vv - fake_vv) < 6
