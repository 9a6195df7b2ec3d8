"""GeoTIFF scene prediction: georeferencing kept, band layout, nodata, input checks, and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from test_export import OVERLAP, STEPS, TILE, fake_run

from crrf_jax import predict
from crrf_jax.data import cloudprob, contract, sen12mscr, synthetic
from crrf_jax.data.contract import DataError
from crrf_jax.inference import CloudRemover

OPTIONS = dict(steps=STEPS, num_samples=2, tile_size=TILE, overlap=OVERLAP, progress=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_run(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def remover(bundle) -> CloudRemover:
    return CloudRemover.from_bundle(bundle)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    """A 150x200 synthetic scene: s1, s2, s2_cloudy and a uint8 cloud-probability file."""
    paths = synthetic.write_synthetic_scene(tmp_path_factory.mktemp("scene"), 150, 200, seed=3)
    with rasterio.open(paths["s2_cloudy"]) as ds:
        cloudy = contract.normalize_s2(np.moveaxis(ds.read(), 0, -1))
        paths["cloud_prob"] = paths["s2_cloudy"].with_name("cloud_prob.tif")
        cloudprob.write_cloud_prob(paths["cloud_prob"], cloudprob.cloud_probability(cloudy[None])[0], ds.crs,
                                   ds.transform)
    return paths


def _rewrite(src: Path, dst: Path, data: np.ndarray | None = None, **profile) -> Path:
    """A copy of the GeoTIFF `src` with other pixels (C, H, W) and/or profile entries."""
    with rasterio.open(src) as ds:
        prof = ds.profile | profile
        data = ds.read() if data is None else data
    prof.update(count=data.shape[0], dtype=data.dtype.name)
    with rasterio.open(dst, "w", **prof) as out:
        out.write(data)
    return dst


def _check_output(out: Path, ref: Path, n_bands: int = 13) -> np.ndarray:
    with rasterio.open(out) as o, rasterio.open(ref) as r:
        assert (o.crs, o.transform, o.width, o.height) == (r.crs, r.transform, r.width, r.height)
        assert o.count == n_bands and set(o.dtypes) == {"uint16"}
        assert o.descriptions == contract.S2_BANDS
        return o.read()


def test_real_sample_scene_keeps_georeferencing(remover, sample_root, tmp_path):
    t = sen12mscr.make_triplet(sample_root, "ROIs1970_fall", 139, 839)  # the cloudy test-split patch
    out, unc = tmp_path / "clear.tif", tmp_path / "std.tif"
    summary = predict.predict_scene(remover, t.s2_cloudy, t.s1, out_path=out, uncertainty_path=unc, **OPTIONS)
    assert summary["tiles"] == 25 and summary["use_sar"]
    dn = _check_output(out, t.s2_cloudy)
    assert dn.max() <= 10000 and dn.std() > 0
    with rasterio.open(unc) as u:
        assert set(u.dtypes) == {"float32"} and u.count == 13 and u.descriptions[8] == "B8A std"
        std = u.read()
        assert np.all(std >= 0) and std.max() > 0
    assert not list(tmp_path.glob("*.partial"))


def test_given_cloud_probability_and_nodata(remover, scene, tmp_path):
    with rasterio.open(scene["s2_cloudy"]) as ds:
        data = ds.read()
    data[:, 10:20, 30:45] = 0  # a nodata hole
    cloudy = _rewrite(scene["s2_cloudy"], tmp_path / "cloudy_nodata.tif", data, nodata=0)
    out, unc = tmp_path / "clear.tif", tmp_path / "std.tif"
    predict.predict_scene(remover, cloudy, scene["s1"], scene["cloud_prob"], out_path=out,
                          uncertainty_path=unc, **OPTIONS)
    dn = _check_output(out, scene["s2_cloudy"])
    with rasterio.open(out) as o, rasterio.open(unc) as u:
        assert o.nodata == 0 and np.isnan(u.nodata)
        std = u.read()
    assert np.all(dn[:, 10:20, 30:45] == 0) and np.all(np.isnan(std[:, 10:20, 30:45]))
    valid = np.ones(dn.shape[1:], bool)
    valid[10:20, 30:45] = False
    assert np.all(dn[:, valid].max(axis=0) > 0) and np.all(np.isfinite(std[:, valid]))


def test_keep_clear_writes_clear_pixels_unchanged(remover, bundle, scene, tmp_path):
    """--keep-clear P: every pixel with cloud probability below P keeps its input DN in every band."""
    out = tmp_path / "kept.tif"
    assert predict.main([f"--bundle={bundle}", f"--s2={scene['s2_cloudy']}",
                         f"--s1={scene['s1']}", f"--cloud-prob={scene['cloud_prob']}", f"--out={out}",
                         f"--steps={STEPS}", f"--tile={TILE}", f"--overlap={OVERLAP}", "--keep-clear=0.4",
                         "--quiet"]) == 0
    with rasterio.open(out) as o, rasterio.open(scene["s2_cloudy"]) as c, rasterio.open(scene["cloud_prob"]) as p:
        dn, cloudy, prob = o.read(), c.read(), p.read(1).astype(np.float32) / 255.0
        assert o.tags()["keep_clear"] == "0.4"
    clear = prob < 0.4
    assert 0 < clear.mean() < 1
    np.testing.assert_array_equal(dn[:, clear], cloudy[:, clear])
    assert np.any(dn[:, ~clear] != cloudy[:, ~clear])
    with pytest.raises(ValueError, match="keep_clear must be a cloud probability"):
        predict.predict_scene(remover, scene["s2_cloudy"], out_path=tmp_path / "x.tif", keep_clear=2.0,
                              **OPTIONS)


def test_grid_mismatch_names_both_files(remover, scene, tmp_path):
    with rasterio.open(scene["s1"]) as ds:
        shifted = ds.transform @ Affine.translation(3, 0)
    s1 = _rewrite(scene["s1"], tmp_path / "s1_shifted.tif", transform=shifted)
    with pytest.raises(DataError, match="s1_shifted.tif: not on the grid of .*s2_cloudy.tif: transform"):
        predict.predict_scene(remover, scene["s2_cloudy"], s1, out_path=tmp_path / "o.tif", **OPTIONS)
    with rasterio.open(scene["s1"]) as ds:
        small = ds.read()[:, :100]
    s1 = _rewrite(scene["s1"], tmp_path / "s1_small.tif", small, height=100)
    with pytest.raises(DataError, match=r"s1_small.tif: not on the grid of .*s2_cloudy.tif: size 100x200 vs"):
        predict.predict_scene(remover, scene["s2_cloudy"], s1, out_path=tmp_path / "o.tif", **OPTIONS)
    assert not (tmp_path / "o.tif").exists() and not (tmp_path / "o.tif.partial").exists()


def test_wrong_bands_and_dtypes_name_the_file(remover, scene, tmp_path):
    with rasterio.open(scene["s2_cloudy"]) as ds:
        data = ds.read()
    twelve = _rewrite(scene["s2_cloudy"], tmp_path / "twelve.tif", data[:12])
    with pytest.raises(DataError, match="twelve.tif: Sentinel-2 must have 13 bands, found 12"):
        predict.predict_scene(remover, twelve, out_path=tmp_path / "o.tif", **OPTIONS)
    s1_int = _rewrite(scene["s1"], tmp_path / "s1_int.tif", np.zeros((2, 150, 200), np.uint16))
    with pytest.raises(DataError, match="s1_int.tif: Sentinel-1 must be float32 or float64, found uint16"):
        predict.predict_scene(remover, scene["s2_cloudy"], s1_int, out_path=tmp_path / "o.tif", **OPTIONS)
    shuffled = _rewrite(scene["s2_cloudy"], tmp_path / "shuffled.tif")
    with rasterio.open(shuffled, "r+") as ds:
        for i, name in enumerate(reversed(contract.S2_BANDS), start=1):
            ds.set_band_description(i, name)
    with pytest.raises(DataError, match="shuffled.tif: bands are described as B12, B11"):
        predict.predict_scene(remover, shuffled, out_path=tmp_path / "o.tif", **OPTIONS)
    with pytest.raises(DataError, match="missing.tif: Sentinel-2 file does not exist"):
        predict.predict_scene(remover, tmp_path / "missing.tif", out_path=tmp_path / "o.tif", **OPTIONS)


def test_bad_pixels_midway_leave_no_partial_output(remover, scene, tmp_path):
    prob = _rewrite(scene["cloud_prob"], tmp_path / "prob.tif", np.full((1, 150, 200), 2.0, np.float32))
    out = tmp_path / "o.tif"
    with pytest.raises(DataError, match=r"prob.tif: cloud probability outside \[0, 1\]"):
        predict.predict_scene(remover, scene["s2_cloudy"], scene["s1"], prob, out_path=out, **OPTIONS)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_cli_end_to_end(bundle, scene, tmp_path, capsys):
    out, unc = tmp_path / "cli.tif", tmp_path / "cli_std.tif"
    args = [f"--bundle={bundle}", f"--s2={scene['s2_cloudy']}", f"--s1={scene['s1']}", f"--out={out}",
            f"--uncertainty={unc}", f"--steps={STEPS}", "--samples=2", f"--tile={TILE}",
            f"--overlap={OVERLAP}", "--quiet"]
    assert predict.main(args) == 0
    assert "150x200, 12 tiles" in capsys.readouterr().out
    _check_output(out, scene["s2_cloudy"])
    assert unc.is_file()
    missing = tmp_path / "no_bundle"
    assert predict.main([f"--bundle={missing}", f"--s2={scene['s2_cloudy']}", f"--out={out}"]) == 1
    assert "no_bundle: bundle directory does not exist" in capsys.readouterr().err


def test_predict_cli_gives_evals_final_image(bundle, tmp_path):
    """eval.py's written prediction of an image and the predict CLI's on the same files are the same DN.

    The flow's cloudy source without noise (sigma 0) makes sampling deterministic, so the two can be compared
    whatever seeds they use: what must agree is the whole path (flow, refiner, clipping, DN conversion)."""
    import json
    import shutil

    from crrf_jax import evaluation

    quiet = tmp_path / "bundle"
    shutil.copytree(bundle, quiet)
    cfg = json.loads((quiet / "config.json").read_text())
    assert cfg["sampling"]["source"] == "cloudy"
    cfg["sampling"]["source_sigma"] = 0.0
    (quiet / "config.json").write_text(json.dumps(cfg))
    remover = CloudRemover.from_bundle(quiet)
    assert remover.has_refiner
    root = tmp_path / "data"
    synthetic.write_synthetic_dataset(root, n_scenes=2, size=TILE, seed=5)
    triplet = sen12mscr.find_triplets(root, "test")[0]
    cloudprob.compute_cloud_probs(root, [triplet], workers=0, progress=False)
    evaluation.evaluate(remover, root=str(root), out=str(tmp_path / "eval"), split="test", steps=STEPS,
                        batch_size=8, write_geotiff=True, references=False, write_examples=False)
    out = tmp_path / "cli.tif"
    assert predict.main([f"--bundle={quiet}", f"--s2={triplet.s2_cloudy}", f"--s1={triplet.s1}",
                         f"--cloud-prob={cloudprob.cloud_prob_path(root, triplet)}", f"--out={out}",
                         f"--steps={STEPS}", "--seed=11", "--quiet"]) == 0
    with rasterio.open(out) as cli, rasterio.open(tmp_path / "eval" / "predictions" / f"{triplet.id}.tif") as ev:
        np.testing.assert_array_equal(cli.read(), ev.read())
