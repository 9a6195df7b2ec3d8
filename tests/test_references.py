"""Learning-free references (mean fill, biharmonic inpainting) and their place in the evaluation.

The fills are checked on hand-made images whose right answer is known: the clear pixels must come back
bit-exact, a mean fill must put the clear-pixel band means into the hole, and a biharmonic fill must reproduce
a linear ramp inside a hole (a linear function is biharmonic). Evaluation runs an oracle remover, which returns
the cloud-free target, on a few small synthetic scenes: it must beat every reference on every group.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from skimage.restoration import inpaint_biharmonic

from crrf_jax import evaluation
from crrf_jax import metrics as M
from crrf_jax import references as R
from crrf_jax.data import cloudprob, contract, pipeline, synthetic


def _image_and_hole(height=24, width=20, bands=3, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.1, 0.9, (height, width, bands)).astype(np.float32)
    mask = np.zeros((height, width), bool)
    mask[6:14, 5:12] = True
    mask[18:21, 2:4] = True
    return image, mask


def test_cloud_mask_matches_metrics_cloudy_mask():
    prob = np.random.default_rng(0).uniform(0, 1, (9, 7, 1)).astype(np.float32)
    prob[0, 0, 0] = 0.5  # exactly the threshold: clear
    expected = np.asarray(M.cloudy_mask(prob, 0.5))
    np.testing.assert_array_equal(R.cloud_mask(prob, 0.5), expected)
    np.testing.assert_array_equal(R.cloud_mask(prob[..., 0], 0.5), expected)
    assert not R.cloud_mask(prob)[0, 0]
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 1\)"):
        R.cloud_mask(np.zeros((4, 4, 2)))


def test_mean_fill_keeps_clear_pixels_and_fills_the_band_means():
    image, mask = _image_and_hole()
    out = R.mean_fill(image, mask)
    assert out.dtype == image.dtype and out.shape == image.shape
    np.testing.assert_array_equal(out[~mask], image[~mask])  # bit-exact
    means = image[~mask].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(out[mask], np.broadcast_to(means, out[mask].shape), rtol=1e-6)


def test_biharmonic_keeps_clear_pixels_and_matches_skimage():
    image, mask = _image_and_hole()
    out = R.biharmonic_fill(image, mask)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    expected = np.clip(inpaint_biharmonic(image, mask, channel_axis=-1), 0, 1)
    np.testing.assert_allclose(out[mask], expected[mask], atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_biharmonic_reproduces_a_linear_ramp_inside_a_hole():
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    ramp = np.stack([0.1 + 0.02 * x, 0.05 + 0.01 * x + 0.015 * y], axis=-1) / 1.5  # two bands on [0, 1]
    mask = np.zeros((32, 32), bool)
    mask[10:22, 8:20] = True
    out = R.biharmonic_fill(ramp, mask)
    np.testing.assert_allclose(out[mask], ramp[mask], atol=1e-4)
    # The mean fill cannot: it is flat in the hole.
    assert np.abs(R.mean_fill(ramp, mask)[mask] - ramp[mask]).max() > 0.05


@pytest.mark.parametrize("name", sorted(R.REFERENCES))
def test_all_cloudy_and_all_clear_images_come_back_unchanged(name):
    image, _ = _image_and_hole()
    for mask in (np.ones(image.shape[:2], bool), np.zeros(image.shape[:2], bool)):
        out = R.REFERENCES[name](image, mask)
        np.testing.assert_array_equal(out, image)
        assert out is not image


def test_fill_batch_fills_each_image_with_its_own_mask():
    image, mask = _image_and_hole()
    cloudy = np.stack([image, image[::-1]])
    prob = np.stack([mask, mask[::-1]]).astype(np.float32)[..., None] * 0.9
    out = R.fill_batch("biharmonic", cloudy, prob, threshold=0.5)
    assert out.shape == cloudy.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], R.biharmonic_fill(image[::-1], mask[::-1]))
    with ThreadPoolExecutor(2) as pool:  # images side by side: each filled alike, in the batch's order
        for name in R.REFERENCES:
            np.testing.assert_array_equal(R.fill_batch(name, cloudy, prob, threshold=0.5, pool=pool),
                                          R.fill_batch(name, cloudy, prob, threshold=0.5))
    with pytest.raises(ValueError, match="unknown reference 'nope'"):
        R.fill_batch("nope", cloudy, prob)
    with pytest.raises(ValueError, match=r"must be \(H, W, C\)"):
        R.mean_fill(image[..., 0], mask)


# ------------------------------------------------------------------------------------------------------------
# Evaluation with an oracle remover
# ------------------------------------------------------------------------------------------------------------


SIZE, N_SCENES = 32, 8


class OracleRemover:
    """Returns each image's cloud-free target (found by its sampling seed); records the options it was given."""

    band_indices = tuple(range(13))
    band_names = tuple(contract.S2_BANDS)
    config = {"sampling": {"steps": 1, "guidance_scale": 1.0}}

    def __init__(self, root):
        self.targets, self.calls = {}, []
        for batch in pipeline.make_dataset(source="geotiff", root=root, split="all", batch_size=4, shuffle=False,
                                           num_epochs=1, drop_remainder=False, to_float32=True):
            for i, image_id in enumerate(batch["id"]):
                if batch["mask"][i]:
                    self.targets[evaluation.image_seed(str(image_id))] = np.asarray(batch["s2"][i], np.float32)

    def use_sar(self, has_s1):
        return has_s1

    platform = "cpu"

    def submit_tiles(self, tiles, tile_ids, **options):
        self.calls.append({k: v for k, v in options.items() if k in ("steps", "output")}
                          | {"cloud_prob_max": float(np.max(tiles["cloud_prob"]))})
        mean = np.stack([self.targets.get(int(i), np.zeros((SIZE, SIZE, 13), np.float32)) for i in tile_ids])
        return lambda: (mean, np.zeros_like(mean))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    synthetic.write_synthetic_dataset(root, n_scenes=N_SCENES, size=SIZE, seed=3)
    cloudprob.compute_cloud_probs(root, workers=1, progress=False)
    return root


def test_oracle_beats_every_reference_and_the_table_shows_them(scenes, tmp_path):
    remover = OracleRemover(scenes)
    result = evaluation.evaluate(remover, root=str(scenes), out=str(tmp_path), split="all", batch_size=3,
                                 write_examples=False, output="final")
    assert result["methods"] == ["model", "cloudy_input", "mean_fill", "biharmonic"]
    assert result["predict_options"] == {"output": "final"} and remover.calls[0]["output"] == "final"
    for method in result["methods"]:
        for group in evaluation.method_groups(method):
            assert set(result[group]) == set(M.METRIC_NAMES), group
            counts = result["image_counts"][group]
            assert 0 < counts["psnr"] <= N_SCENES
    assert result["image_counts"]["model"]["psnr"] == N_SCENES
    assert result["model"]["psnr"] == np.inf and result["model"]["sam"] < 0.01  # the target (float rounding)
    for name in ("cloudy_input", *R.REFERENCES):
        for suffix in ("", "_cloudy_pixels"):
            assert result["model" + suffix]["rmse"] < result[name + suffix]["rmse"], name + suffix
            assert result["model" + suffix]["ssim"] > result[name + suffix]["ssim"], name + suffix
    # The references keep clear pixels: their clear-pixel scores are the cloudy input's.
    for name in R.REFERENCES:
        assert result[f"{name}_clear_pixels"]["rmse"] == pytest.approx(result["cloudy_input_clear_pixels"]["rmse"])
    # A biharmonic fill continues the ground, the mean fill does not: it should be the better reference.
    assert result["biharmonic_cloudy_pixels"]["rmse"] < result["cloudy_input_cloudy_pixels"]["rmse"]

    table = evaluation.format_table(result)
    for name in result["methods"]:
        assert f"\n{name} " in table
    assert "cloudy pixels" in table and "clear" in table and "psnr" in table
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["image_counts"] == result["image_counts"]
    header = (tmp_path / "per_image.csv").read_text().splitlines()[0].split(",")
    assert "biharmonic_cloudy_pixels/psnr" in header and "psnr" in header


def test_zero_cloud_prob_reaches_the_model_only(scenes, tmp_path):
    remover = OracleRemover(scenes)
    result = evaluation.evaluate(remover, root=str(scenes), out=str(tmp_path), split="all", batch_size=8,
                                 references=False, zero_cloud_prob=True, write_examples=False)
    assert remover.calls and all(c["cloud_prob_max"] == 0.0 for c in remover.calls)
    assert result["methods"] == ["model", "cloudy_input"] and "mean_fill" not in result
    assert result["zero_cloud_prob"] is True and result["mean_cloud_fraction"] > 0  # scored with the real map
    table = evaluation.format_table(result)
    assert "cloud probability zeroed" in table and "mean_fill" not in table


def test_rgb255_metric_set_adds_emrdm_metrics(scenes, tmp_path):
    from safetensors.numpy import save_file

    from crrf_jax import rgb_metrics
    from crrf_jax.models import lpips

    rng = np.random.default_rng(0)
    weights = tmp_path / "lpips_alex.safetensors"  # random LPIPS-alex weights (the network is tested elsewhere)
    save_file({k: np.abs(rng.normal(0, 0.1, shape)).astype(np.float32)
               for k, shape in lpips.state_dict_shapes().items()}, str(weights))
    result = evaluation.evaluate(OracleRemover(scenes), root=str(scenes), out=str(tmp_path), split="all",
                                 batch_size=4, references=False, write_examples=False, metric_set="rgb255",
                                 lpips_weights=str(weights))
    assert result["metric_set"] == "rgb255"
    assert result["rgb255"] == {"bands": ["B04", "B03", "B02", "B08"], "lpips_weights": str(weights)}
    extra = set(rgb_metrics.METRIC_NAMES) | {"lpips"}
    assert set(result["model"]) == set(M.METRIC_NAMES) | extra
    assert set(result["model_cloudy_pixels"]) == set(M.METRIC_NAMES)  # EMRDM has no masked 8-bit metrics
    assert result["model"]["psnr_255"] == np.inf and result["model"]["ssim_255"] == pytest.approx(1.0)
    assert result["model"]["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(result["cloudy_input"]["psnr_255"]) and result["cloudy_input"]["lpips"] > 0
    header = (tmp_path / "per_image.csv").read_text().splitlines()[0].split(",")
    assert {"psnr_255", "lpips", "cloudy_input/ssim_255"} <= set(header)
    table = evaluation.format_table(result)
    assert "8-bit (EMRDM)" in table and "psnr_255" in table and "lpips" in table
    assert "psnr_255" not in evaluation.format_table({k: v for k, v in result.items() if k != "model"} | {
        "model": {k: v for k, v in result["model"].items() if k in M.METRIC_NAMES}})


def test_sen2mtc_metric_set_adds_emrdm_metrics(scenes, tmp_path):
    from safetensors.numpy import save_file

    from crrf_jax import rgb_metrics
    from crrf_jax.models import lpips

    rng = np.random.default_rng(0)
    weights = tmp_path / "lpips_alex.safetensors"  # random LPIPS-alex weights (the network is tested elsewhere)
    save_file({k: np.abs(rng.normal(0, 0.1, shape)).astype(np.float32)
               for k, shape in lpips.state_dict_shapes().items()}, str(weights))
    result = evaluation.evaluate(OracleRemover(scenes), root=str(scenes), out=str(tmp_path), split="all",
                                 batch_size=4, references=False, write_examples=False, metric_set="sen2mtc",
                                 lpips_weights=str(weights))
    assert result["metric_set"] == "sen2mtc" and "rgb255" not in result
    assert result["sen2mtc"] == {"bands": ["B04", "B03", "B02"], "lpips_weights": str(weights)}
    extra = set(rgb_metrics.SEN2MTC_METRIC_NAMES) | {"lpips_mtc"}
    assert set(result["model"]) == set(M.METRIC_NAMES) | extra
    assert set(result["model_cloudy_pixels"]) == set(M.METRIC_NAMES)  # EMRDM has no masked Sen2_MTC metrics
    assert result["model"]["psnr_mtc"] == np.inf and result["model"]["ssim_mtc"] == pytest.approx(1.0)
    # float32 arccos next to 1: identical images come out a few 1e-3 degrees, as the default set's "sam" does
    assert result["model"]["sam_mtc"] < 0.01 and result["model"]["lpips_mtc"] == pytest.approx(0.0, abs=1e-6)
    cloudy = result["cloudy_input"]
    assert np.isfinite(cloudy["psnr_mtc"]) and cloudy["sam_mtc"] > 0 and cloudy["lpips_mtc"] > 0
    assert cloudy["psnr_mtc"] != pytest.approx(cloudy["psnr"])  # stretched RGB, not the 4 bands on [0, 1]
    header = (tmp_path / "per_image.csv").read_text().splitlines()[0].split(",")
    assert {"psnr_mtc", "lpips_mtc", "cloudy_input/sam_mtc"} <= set(header)
    table = evaluation.format_table(result)
    assert "Sen2_MTC (EMRDM)" in table and "lpips_mtc" in table and "8-bit" not in table


def test_metric_scorer_keeps_the_default_scores():
    rng = np.random.default_rng(1)
    target = rng.random((2, 16, 16, 4), dtype=np.float32)
    methods = {"model": np.clip(target + 0.1 * rng.standard_normal(target.shape), 0, 1).astype(np.float32)}
    prob = rng.random((2, 16, 16, 1), dtype=np.float32)
    names = ("B04", "B03", "B02", "B08")
    assert evaluation.metric_scorer("sen12mscr", names) is None
    plain = evaluation.score_methods(methods, target, prob)
    scorer = evaluation.metric_scorer("rgb255", names)
    both = evaluation.score_methods(methods, target, prob, extra=scorer)
    for group, values in plain.items():
        if group == "cloud_fraction":
            continue
        for metric, value in values.items():
            np.testing.assert_array_equal(both[group][metric], value)  # bit-identical
    assert set(both["model"]) - set(plain["model"]) == {"psnr_255", "ssim_255"}
    mtc = evaluation.score_methods(methods, target, prob, extra=evaluation.metric_scorer("sen2mtc", names))
    for group, values in plain.items():
        if group != "cloud_fraction":
            for metric, value in values.items():
                np.testing.assert_array_equal(mtc[group][metric], value)  # bit-identical
    assert set(mtc["model"]) - set(plain["model"]) == {f"{m}_mtc" for m in M.METRIC_NAMES}
    with pytest.raises(ValueError, match="metric_set='rgb'"):
        evaluation.metric_scorer("rgb", names)
    with pytest.raises(ValueError, match="only with metric_set='rgb255'"):
        evaluation.metric_scorer("sen12mscr", names, "lpips.safetensors")
    with pytest.raises(ValueError, match="lack B04"):
        evaluation.metric_scorer("rgb255", ("B02", "B03", "B08"))


# ------------------------------------------------------------------------------------ least-cloudy composite


def test_least_cloudy_composite_hand_built():
    # Three dates of a 2 x 3 image, one band whose value is the date index + 10 x the pixel number.
    dates = (np.arange(3)[:, None, None, None] + 10.0 * np.arange(6).reshape(1, 2, 3, 1)).astype(np.float32)
    prob = np.array([
        [[0.9, 0.1, 0.5], [0.3, 0.2, 0.7]],
        [[0.2, 0.1, 0.5], [0.3, 0.8, 0.6]],
        [[0.4, 0.6, 0.5], [0.1, 0.8, 0.6]],
    ], np.float32)
    # Pixel by pixel: date 1; tie 0/1 -> 0; three-way tie -> 0; date 2; date 0; tie 1/2 -> 1.
    want_date = np.array([[1, 0, 0], [2, 0, 1]])
    want = (want_date + 10.0 * np.arange(6).reshape(2, 3))[..., None].astype(np.float32)
    for p in (prob, prob[..., None]):
        out = R.least_cloudy_composite(dates, p)
        assert out.shape == (2, 3, 1) and out.dtype == np.float32
        np.testing.assert_array_equal(out, want)


def test_least_cloudy_composite_matches_a_loop():
    rng = np.random.default_rng(7)
    t, h, w, c = 4, 9, 7, 3
    stack = rng.uniform(0, 1, (t, h, w, c)).astype(np.float32)
    prob = rng.integers(0, 4, (t, h, w, 1)).astype(np.float32) / 3  # few levels: many ties
    out = R.least_cloudy_composite(stack, prob)
    want = np.empty((h, w, c), np.float32)
    for i in range(h):
        for j in range(w):
            best = 0
            for d in range(1, t):
                if prob[d, i, j, 0] < prob[best, i, j, 0]:
                    best = d
            want[i, j] = stack[best, i, j]
    np.testing.assert_array_equal(out, want)


def test_least_cloudy_composite_rejects_bad_input_and_is_not_a_single_image_reference():
    stack = np.zeros((3, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="cloud_prob"):
        R.least_cloudy_composite(stack, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        R.least_cloudy_composite(stack, np.full((3, 4, 4), np.nan))
    with pytest.raises(ValueError, match=r"\(T, H, W, C\)"):
        R.least_cloudy_composite(stack[0], np.zeros((4, 4, 2)))
    assert R.least_cloudy_composite not in R.REFERENCES.values()
