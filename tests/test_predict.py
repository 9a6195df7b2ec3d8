"""GeoTIFF scene prediction: georeferencing kept, band layout, nodata, input checks, and the CLI."""

from __future__ import annotations

import logging
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


def _warp(src: Path, dst: Path, crs: str, resolution: float, keep_columns: int | None = None) -> Path:
    """`src` reprojected to another CRS and pixel size (bilinear); with `keep_columns`, only the western
    `keep_columns` 10 m columns of the source carry data (the rest of its footprint is cut off)."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(src) as ds:
        data = ds.read()
        if keep_columns is not None:
            data = data[:, :, :keep_columns]
        bounds = rasterio.transform.array_bounds(data.shape[1], data.shape[2], ds.transform)
        transform, width, height = calculate_default_transform(ds.crs, crs, data.shape[2], data.shape[1],
                                                               *bounds, resolution=resolution)
        out = np.full((ds.count, height, width), np.nan, np.float32)
        reproject(data, out, src_transform=ds.transform, src_crs=ds.crs, dst_transform=transform, dst_crs=crs,
                  resampling=Resampling.bilinear, src_nodata=np.nan, dst_nodata=np.nan)
        profile = ds.profile | dict(crs=crs, transform=transform, width=width, height=height, nodata=np.nan,
                                    dtype="float32")
    with rasterio.open(dst, "w", **profile) as out_ds:
        out_ds.write(out)
    return dst


def test_sar_on_another_grid_is_reprojected_and_tiles_outside_its_footprint_run_without_it(remover, scene,
                                                                                          tmp_path):
    """S1 in another UTM zone at 20 m: the output is on the S2 grid. Cut to the western 64 columns, the tiles
    wholly east of its footprint give exactly the SAR-absent prediction there; the western ones use SAR."""
    with rasterio.open(scene["s1"]) as ds:
        zone = ds.crs.to_epsg()
    other = f"EPSG:{zone + 1 if zone % 100 < 60 else zone - 1}"
    s1_20m = _warp(scene["s1"], tmp_path / "s1_20m.tif", other, 20.0)
    out = tmp_path / "clear.tif"
    summary = predict.predict_scene(remover, scene["s2_cloudy"], s1_20m, scene["cloud_prob"], out_path=out,
                                    **OPTIONS)
    assert summary["use_sar"]
    _check_output(out, scene["s2_cloudy"])
    half = _warp(scene["s1"], tmp_path / "s1_west.tif", other, 20.0, keep_columns=64)
    runs = {}
    for name, s1 in (("west", half), ("none", None), ("full", scene["s1"])):
        path = tmp_path / f"{name}.tif"
        predict.predict_scene(remover, scene["s2_cloudy"], s1, scene["cloud_prob"], out_path=path, **OPTIONS)
        with rasterio.open(path) as ds:
            runs[name] = ds.read().astype(np.int32)
    # Tiles are 64 wide with 16 overlap (starts 0, 48, 96, 136): columns from 112 on see only tiles starting
    # at 96 or later, which the western 64 columns (+ a 20 m pixel of bilinear support) do not cover.
    east, west = np.s_[:, :, 112:], np.s_[:, :, :40]
    np.testing.assert_array_equal(runs["west"][east], runs["none"][east])
    assert np.abs(runs["west"][west] - runs["none"][west]).max() > 0
    assert np.abs(runs["full"][east] - runs["none"][east]).max() > 0  # SAR does change those pixels


def test_cloud_probability_off_the_grid_names_both_files(remover, scene, tmp_path):
    with rasterio.open(scene["cloud_prob"]) as ds:
        shifted = ds.transform @ Affine.translation(3, 0)
    prob = _rewrite(scene["cloud_prob"], tmp_path / "prob_shifted.tif", transform=shifted)
    with pytest.raises(DataError, match="prob_shifted.tif: not on the grid of .*s2_cloudy.tif: transform"):
        predict.predict_scene(remover, scene["s2_cloudy"], scene["s1"], prob, out_path=tmp_path / "o.tif",
                              **OPTIONS)
    assert not (tmp_path / "o.tif").exists() and not list(tmp_path.glob("*.partial"))


def test_wrong_bands_and_units_name_the_file(remover, scene, tmp_path, caplog):
    with rasterio.open(scene["s2_cloudy"]) as ds:
        data = ds.read()
    twelve = _rewrite(scene["s2_cloudy"], tmp_path / "twelve.tif", data[:12])
    with pytest.raises(DataError, match="twelve.tif: has 12 bands without band names"):
        predict.predict_scene(remover, twelve, out_path=tmp_path / "o.tif", **OPTIONS)
    s1_int = _rewrite(scene["s1"], tmp_path / "s1_int.tif", np.zeros((2, 150, 200), np.uint16))
    with pytest.raises(DataError, match="s1_int.tif: Sentinel-1 must be float32 or float64, found uint16"):
        predict.predict_scene(remover, scene["s2_cloudy"], s1_int, out_path=tmp_path / "o.tif", **OPTIONS)
    with pytest.raises(DataError, match="missing.tif"):
        predict.predict_scene(remover, tmp_path / "missing.tif", out_path=tmp_path / "o.tif", **OPTIONS)
    # Reflectance floats (DN / 10000) are recognised, scaled back and predicted like the DN file.
    as_reflectance = (data / 10000.0).astype(np.float32)
    reflectance = _rewrite(scene["s2_cloudy"], tmp_path / "reflectance.tif", as_reflectance)
    with caplog.at_level(logging.WARNING):
        predict.predict_scene(remover, reflectance, scene["s1"], scene["cloud_prob"],
                              out_path=tmp_path / "r.tif", **OPTIONS)
    assert "reflectance.tif" in caplog.text and "reflectance" in caplog.text.lower()
    predict.predict_scene(remover, scene["s2_cloudy"], scene["s1"], scene["cloud_prob"],
                          out_path=tmp_path / "d.tif", **OPTIONS)
    assert np.abs(d_dn(tmp_path / "r.tif") - d_dn(tmp_path / "d.tif")).max() <= 1
    # Linear-power SAR is recognised (a warning names the file) and converted to dB.
    with rasterio.open(scene["s1"]) as ds:
        linear = (10.0 ** (ds.read() / 10.0)).astype(np.float32)
    power = _rewrite(scene["s1"], tmp_path / "s1_linear.tif", linear)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predict.predict_scene(remover, scene["s2_cloudy"], power, scene["cloud_prob"],
                              out_path=tmp_path / "p.tif", **OPTIONS)
    assert "s1_linear.tif" in caplog.text and "linear" in caplog.text.lower()
    assert np.abs(d_dn(tmp_path / "p.tif") - d_dn(tmp_path / "d.tif")).max() <= 1


def d_dn(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read().astype(np.int32)


def test_safe_product_and_band_folder_predict_like_the_stacked_file(remover, tmp_path):
    """A generated L1C SAFE product (JP2 bands at 10/20/60 m, baseline 05.09 with offsets -1000) and a folder
    of its band files (GeoTIFFs, without the metadata: the offset is given) give the prediction of the
    stacked GeoTIFF holding what the product reads on the 10 m grid (bands resampled, offset removed)."""
    from test_scene_s2 import SIZE, make_product

    from crrf_jax.scene import s2 as scene_s2

    safe = make_product(tmp_path / "product")
    with scene_s2.open_s2(safe) as product:
        dn = product.read(0, SIZE, contract.S2_BANDS)
        dn[~product.valid(0, SIZE)] = 0.0  # the product's nodata pixel, nodata in every band of the stack too
        crs, transform = product.crs, product.transform
    stacked = tmp_path / "stacked.tif"
    with rasterio.open(stacked, "w", driver="GTiff", width=SIZE, height=SIZE, count=13, dtype="float32",
                       crs=crs, transform=transform, nodata=0) as ds:
        ds.write(np.moveaxis(dn, -1, 0))
    folder = tmp_path / "bands"
    folder.mkdir()
    for band_file in sorted(safe.rglob("*.jp2")):  # as per-band GeoTIFFs with their nodata (0) declared
        with rasterio.open(band_file) as src:
            profile = src.profile | dict(driver="GTiff", nodata=0)
            with rasterio.open(folder / band_file.with_suffix(".tif").name, "w", **profile) as dst:
                dst.write(src.read())
    outs = {}
    for name, path, offset in (("safe", safe, None), ("folder", folder, 1000), ("stacked", stacked, 0)):
        outs[name] = tmp_path / f"{name}_clear.tif"
        predict.predict_scene(remover, path, out_path=outs[name], s2_offset=offset, **OPTIONS)
    ref = d_dn(outs["stacked"])
    np.testing.assert_array_equal(d_dn(outs["safe"]), ref)
    np.testing.assert_array_equal(d_dn(outs["folder"]), ref)
    with rasterio.open(outs["safe"]) as o:
        assert (o.crs, o.transform) == (crs, transform) and o.nodata == 0
        assert o.read()[:, 0, 0].tolist() == [0] * 13
        assert o.tags()["s2_level"] == "L1C" and float(o.tags()["s2_offset"]) == 1000


def test_outputs_are_cloud_optimized_with_quicklook_and_change_mask(bundle, scene, tmp_path):
    out = tmp_path / "cog.tif"
    args = [f"--bundle={bundle}", f"--s2={scene['s2_cloudy']}", f"--s1={scene['s1']}", f"--out={out}",
            f"--uncertainty={tmp_path / 'std.tif'}", f"--quicklook={tmp_path / 'rgb.png'}",
            f"--change-mask={tmp_path / 'changed.tif'}", f"--cloud-prob={scene['cloud_prob']}",
            "--keep-clear=0.4",
            f"--steps={STEPS}", f"--tile={TILE}", f"--overlap={OVERLAP}", "--compress=zstd", "--quiet"]
    assert predict.main(args) == 0
    for name in ("cog.tif", "std.tif", "changed.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG", name
            assert ds.profile["tiled"] and ds.compression.name.lower() == "zstd", name
            with rasterio.open(scene["s2_cloudy"]) as src:
                assert (ds.crs, ds.transform) == (src.crs, src.transform)
    with rasterio.open(tmp_path / "changed.tif") as ds:
        changed = ds.read(1)
    with rasterio.open(scene["cloud_prob"]) as ds:
        clear = ds.read(1).astype(np.float32) / 255.0 < 0.4
    assert set(np.unique(changed)) <= {0, 1} and 0 < changed.mean() < 1
    assert np.all(changed[clear] == 0) and changed[~clear].mean() > 0.5  # kept pixels are not changes
    with rasterio.open(out) as o, rasterio.open(scene["s2_cloudy"]) as src:  # the mask's definition, exactly
        bands = [contract.S2_BANDS.index(name) + 1 for name in o.descriptions]
        came_in = np.clip(src.read(bands).astype(np.float64) - float(o.tags()["s2_offset"]), 0, contract.S2_DN_MAX)
        moved = np.abs(o.read().astype(np.float64) - np.rint(came_in))
    np.testing.assert_array_equal(changed, np.any(moved > predict.CHANGE_DN, axis=0))
    from PIL import Image

    with Image.open(tmp_path / "rgb.png") as png:
        assert png.size == (200, 150) and png.mode == "RGB"


@pytest.mark.parametrize("flag, message", [
    ("--steps=0", "--steps=0: must be >= 1"), ("--samples=0", "--samples=0: must be >= 1"),
    ("--tile=8", "--tile=8: must be >= 16"), ("--overlap=-1", "--overlap=-1: must be >= 0"),
    ("--batch-size=0", "--batch-size=0: must be >= 1"), ("--keep-clear=1.5", "--keep-clear=1.5: must be a"),
    ("--s2-offset=-5", "--s2-offset=-5.0: must be a DN offset"), ("--s1-units=amplitude", "invalid choice"),
])
def test_bad_flag_values_are_errors_naming_the_flag(bundle, scene, tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([f"--bundle={bundle}", f"--s2={scene['s2_cloudy']}", f"--out={tmp_path / 'o.tif'}",
                      flag])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()


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


def test_evaluation_overlapping_the_model_and_threaded_references_changes_no_figure(remover, tmp_path):
    """The references filled side by side while the devices sample the batch: metrics.json and per_image.csv
    are those of the one-thread, one-after-the-other evaluation, except for its seconds and how it ran."""
    import json

    from crrf_jax import evaluation

    root = tmp_path / "data"
    synthetic.write_synthetic_dataset(root, n_scenes=5, size=TILE, seed=8)
    cloudprob.compute_cloud_probs(root, workers=0, progress=False)
    results = {}
    for name, threads, overlap in (("serial", 1, False), ("overlapped", 3, True)):
        out = tmp_path / name
        result = evaluation.evaluate(remover, root=str(root), out=str(out), split="all", steps=STEPS,
                                     num_samples=2, batch_size=2, write_examples=False,
                                     reference_threads=threads, overlap=overlap)
        assert (result["reference_threads"], result["model_overlapped"]) == (threads, overlap)
        assert set(result["wall_s"]) == {"model", "mean_fill", "biharmonic"}
        assert result["wall_s"]["model"] > 0
        saved = json.loads((out / "metrics.json").read_text())
        results[name] = ({k: v for k, v in saved.items() if k not in ("wall_s", "reference_threads",
                                                                         "model_overlapped")},
                         (out / "per_image.csv").read_text())
    assert results["serial"][1].count("\n") == 6  # a header and every image
    assert results["overlapped"] == results["serial"]
    assert remover.platform == "cpu"
    default = evaluation.evaluate(remover, root=str(root), out=str(tmp_path / "default"), split="all",
                                  steps=STEPS, batch_size=4, max_images=1, write_examples=False)
    assert default["model_overlapped"] is False  # on the CPU the model and the references share the cores
