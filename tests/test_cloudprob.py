"""s2cloudless cloud probability: values on the real sample, cache round trip, resume, parallel run, CLI."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from crrf_jax.data import cloudprob as cp
from crrf_jax.data import contract
from crrf_jax.data import sen12mscr as sd

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sen12mscr_sample"
REPO = Path(__file__).resolve().parents[1]
FALL = "ROIs1970_fall_139_p839"
WINTER = "ROIs2017_winter_112_p797"
QUANT = 0.5 / 255 + 1e-6  # uint8 cache quantisation


def link_sample(root: Path) -> Path:
    """A writable root whose GeoTIFFs are symlinks to the real sample (the cache is written next to them)."""
    if not (SAMPLE / "ROIs1970_fall_s1").is_dir():
        pytest.skip(f"real SEN12MS-CR sample not found at {SAMPLE}")
    for f in SAMPLE.rglob("*.tif"):
        dst = root / f.relative_to(SAMPLE)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(f)
    return root


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(root, triplets, {id: probability from cloud_probability}) with the cache computed in-process."""
    root = link_sample(tmp_path_factory.mktemp("cached"))
    triplets = sd.find_triplets(root)
    cloudy = np.stack([sd.read_triplet(t)["s2_cloudy"] for t in triplets])
    probs = cp.cloud_probability(cloudy)
    report = cp.compute_cloud_probs(root, workers=0, batch_size=2, progress=False)
    assert (report.computed, report.skipped_existing, report.failed) == (2, 0, [])
    return root, triplets, {t.id: p for t, p in zip(triplets, probs, strict=True)}


def test_cloud_probability_on_real_sample(cached):
    _, _, probs = cached
    for p in probs.values():
        assert p.shape == (256, 256, 1) and p.dtype == np.float32
        assert 0.0 <= p.min() and p.max() <= 1.0
    assert probs[FALL].mean() > 0.5  # almost fully clouded
    assert probs[WINTER].mean() < 0.3  # nearly clear
    assert probs[FALL].mean() > probs[WINTER].mean() + 0.3


def test_matches_s2cloudless_on_raw_digital_numbers():
    root = SAMPLE
    if not root.is_dir():
        pytest.skip(f"real SEN12MS-CR sample not found at {SAMPLE}")
    from s2cloudless import S2PixelCloudDetector

    t = sd.find_triplets(root, "test")[0]
    with rasterio.open(t.s2_cloudy) as ds:
        dn = ds.read(window=Window(0, 0, 48, 48))
    reference = S2PixelCloudDetector(all_bands=True).get_cloud_probability_maps(
        np.moveaxis(dn, 0, -1)[None].astype(np.float32) / 10000.0
    )
    ours = cp.cloud_probability(sd.read_triplet(t, window=Window(0, 0, 48, 48))["s2_cloudy"][None])
    np.testing.assert_allclose(ours[..., 0], reference, atol=1e-6)


def test_cloud_probability_rejects_bad_input():
    with pytest.raises(ValueError, match="all 13 Sentinel-2 bands"):
        cp.cloud_probability(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 13\)"):
        cp.cloud_probability(np.zeros((8, 8, 13), np.float32))
    bad = np.zeros((1, 4, 4, 13), np.float32)
    bad[0, 1, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cp.cloud_probability(bad)


def test_cache_round_trip(cached):
    root, triplets, probs = cached
    for t in triplets:
        path = cp.cloud_prob_path(root, t)
        n = t.scene
        assert (
            path
            == root / f"{t.season}_cloudprob" / f"cloudprob_{n}" / f"{t.season}_cloudprob_{n}_p{t.patch}.tif"
        )
        with rasterio.open(path) as ds, rasterio.open(t.s2_cloudy) as ref:
            assert (ds.count, ds.dtypes[0], ds.shape) == (1, "uint8", (256, 256))
            assert ds.crs == ref.crs and ds.transform == ref.transform
        loaded = cp.load_cloud_prob(root, t)
        assert loaded.shape == (256, 256, 1) and loaded.dtype == np.float32
        np.testing.assert_allclose(loaded, probs[t.id], atol=QUANT)
        part = cp.load_cloud_prob(root, t, window=Window(10, 20, 30, 40))
        np.testing.assert_array_equal(part, loaded[20:60, 10:40])
    assert not list(root.rglob("*.partial"))


def test_missing_cache_tells_the_command(tmp_path):
    t = sd.make_triplet(tmp_path, "ROIs1158_spring", 1, 1)
    with pytest.raises(FileNotFoundError, match="python -m crrf_jax.data.cloudprob --root") as err:
        cp.load_cloud_prob(tmp_path, t)
    assert str(err.value).startswith(str(cp.cloud_prob_path(tmp_path, t)))


def test_resume_skips_complete_files(cached, tmp_path):
    src_root, triplets, probs = cached
    root = link_sample(tmp_path)
    fall, winter = (next(t for t in triplets if t.id == i) for i in (FALL, WINTER))
    # The fall file is "done" (a sentinel value that a recomputation would overwrite); the winter one was
    # interrupted mid-write: only its .partial exists.
    with rasterio.open(cp.cloud_prob_path(src_root, fall)) as ds:
        crs, transform = ds.crs, ds.transform
    cp.write_cloud_prob(cp.cloud_prob_path(root, fall), np.full((256, 256, 1), 0.5), crs, transform)
    partial = cp.cloud_prob_path(root, winter).with_name(cp.cloud_prob_path(root, winter).name + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a tiff")

    report = cp.compute_cloud_probs(root, workers=0, progress=False)
    assert (report.computed, report.skipped_existing) == (1, 1)
    assert not partial.exists()
    np.testing.assert_allclose(cp.load_cloud_prob(root, fall), 128 / 255)  # untouched
    np.testing.assert_allclose(cp.load_cloud_prob(root, winter), probs[WINTER], atol=QUANT)

    again = cp.compute_cloud_probs(root, workers=0, progress=False)
    assert (again.computed, again.skipped_existing) == (0, 2)


def test_parallel_workers_match_in_process(cached, tmp_path):
    _, triplets, probs = cached
    root = link_sample(tmp_path)
    report = cp.compute_cloud_probs(root, workers=2, batch_size=1, progress=False)
    assert (report.computed, report.skipped_existing) == (2, 0)
    for t in triplets:
        np.testing.assert_allclose(cp.load_cloud_prob(root, t), probs[t.id], atol=QUANT + 1 / 255)


def _tiny_triplet(root: Path, scene: int) -> sd.Triplet:
    rng = np.random.default_rng(scene)
    t = sd.make_triplet(root, "ROIs1158_spring", scene, 1)
    profile = dict(driver="GTiff", height=8, width=8, crs="EPSG:32631", transform=from_origin(0, 80, 10, 10))
    for path, count, dtype in ((t.s1, 2, "float32"), (t.s2, 13, "uint16"), (t.s2_cloudy, 13, "uint16")):
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.uniform(-20, 0, (2, 8, 8)) if count == 2 else rng.integers(0, 9000, (13, 8, 8))
        with rasterio.open(path, "w", count=count, dtype=dtype, **profile) as dst:
            dst.write(data.astype(dtype))
    return t


def test_bad_cloudy_file_raises_or_is_skipped(tmp_path, caplog):
    good, bad = _tiny_triplet(tmp_path, 1), _tiny_triplet(tmp_path, 2)
    bad.s2_cloudy.write_bytes(b"not a tiff")
    with pytest.raises(contract.DataError) as err:
        cp.compute_cloud_probs(tmp_path, workers=0, progress=False)
    assert str(err.value).startswith(str(bad.s2_cloudy))
    assert cp.cloud_prob_path(tmp_path, good).is_file()  # the rest of the failing batch was written
    cp.cloud_prob_path(tmp_path, good).unlink()
    log = sd.BadSampleLog()
    with caplog.at_level(logging.WARNING):
        report = cp.compute_cloud_probs(tmp_path, workers=0, on_error="skip", bad_samples=log, progress=False)
    assert report.computed == 1 and [f for f, _ in report.failed] == [str(bad.s2_cloudy)]
    assert log.count == 1 and log.entries[0].id == bad.id and bad.id in caplog.text
    assert cp.cloud_prob_path(tmp_path, good).is_file() and not cp.cloud_prob_path(tmp_path, bad).exists()


def test_cli(tmp_path, capsys):
    root = link_sample(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "crrf_jax.data.cloudprob",
        "--root",
        str(root),
        "--split",
        "train",
        "--workers",
        "1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "computed 1, already cached 0, failed 0" in run.stdout
    winter = sd.find_triplets(root, "train")[0]
    assert cp.load_cloud_prob(root, winter).mean() < 0.3
    assert not cp.cloud_prob_path(root, sd.find_triplets(root, "test")[0]).exists()

    assert cp.main(["--root", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
