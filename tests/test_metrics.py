"""Metrics vs scikit-image, a SciPy zero-padded SSIM, a PyTorch transcription of UnCRtainTS, hand cases."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from crrf_jax import metrics

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "sen12mscr_sample"


def _pair(seed: int = 0, shape=(24, 28, 4), noise: float = 0.08):
    """A smooth-ish target on [0, 1] and a noisy prediction that leaves [0, 1] in places."""
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.uniform(0, 1, shape), sigma=(2, 2, 0))
    target = (target - target.min()) / (target.max() - target.min())
    pred = target + noise * rng.standard_normal(shape)
    return pred.astype(np.float32), target.astype(np.float32)


# ------------------------------------------------------------------------------------------ references


def scipy_ssim_map(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Zero-padded Gaussian SSIM map in float64 with scipy.ndimage.correlate(mode='constant'), (H, W, C)."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    p, t = pred.astype(np.float64), target.astype(np.float64)
    out = np.empty_like(p)
    for c in range(p.shape[-1]):

        def blur(a):
            return ndimage.correlate(a, window, mode="constant", cval=0.0)

        mu_p, mu_t = blur(p[..., c]), blur(t[..., c])
        var_p = blur(p[..., c] ** 2) - mu_p**2
        var_t = blur(t[..., c] ** 2) - mu_t**2
        cov = blur(p[..., c] * t[..., c]) - mu_p * mu_t
        c1, c2 = 0.01**2, 0.03**2
        out[..., c] = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / (
            (mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2)
        )
    return out


def torch_reference_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """UnCRtainTS/EMRDM img_metrics transcribed to PyTorch: (1, C, H, W) tensors, conv2d(padding=5)."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    p = torch.from_numpy(np.moveaxis(pred, -1, 0)[None].copy())
    t = torch.from_numpy(np.moveaxis(target, -1, 0)[None].copy())
    rmse = torch.sqrt(torch.mean((t - p) ** 2))
    dot = torch.sum(t * p, 1) / torch.sqrt(torch.sum(t * t, 1)) / torch.sqrt(torch.sum(p * p, 1))
    sam = torch.mean(torch.rad2deg(torch.acos(torch.clamp(dot, -1, 1))))
    channels = p.shape[1]
    g = torch.tensor([math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)], dtype=torch.float32)
    g = g / g.sum()
    window = torch.outer(g, g).expand(channels, 1, 11, 11).contiguous()

    def conv(a):
        return f.conv2d(a, window, padding=5, groups=channels)

    mu_p, mu_t = conv(p), conv(t)
    var_p, var_t = conv(p * p) - mu_p**2, conv(t * t) - mu_t**2
    cov = conv(p * t) - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return {
        "rmse": rmse.item(),
        "psnr": (20 * torch.log10(1 / rmse)).item(),
        "mae": torch.mean(torch.abs(t - p)).item(),
        "sam": sam.item(),
        "ssim": ssim.mean().item(),
    }


def _as_float(d):
    return {k: float(v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------ SSIM


def test_gaussian_window_is_normalised_and_symmetric():
    g = metrics.gaussian_window_1d()
    assert g.shape == (11,) and g.dtype == np.float32
    np.testing.assert_allclose(g.sum(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(g, g[::-1])
    assert np.argmax(g) == 5


def test_ssim_map_matches_scipy_zero_padded_reference():
    pred, target = _pair(1)
    pred = np.clip(pred, 0, 1)
    ours = np.asarray(metrics.ssim_map(pred, target))
    ref = scipy_ssim_map(pred, target)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    # zero padding matters: at the border the map differs from scikit-image's reflect-padded one
    _, reflect_map = structural_similarity(
        target, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=-1, full=True,
    )
    assert np.abs(ours[0] - reflect_map[0]).max() > 1e-2


def test_ssim_interior_matches_skimage():
    pred, target = _pair(2)
    pred = np.clip(pred, 0, 1)
    mssim, full = structural_similarity(
        target, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=-1, full=True,
    )
    ours = np.asarray(metrics.ssim_map(pred, target))
    # skimage reflects at the border and averages only the interior (5-pixel crop): there the maps coincide
    np.testing.assert_allclose(ours[5:-5, 5:-5], full[5:-5, 5:-5], atol=2e-5)
    np.testing.assert_allclose(ours[5:-5, 5:-5].mean(), mssim, atol=1e-5)


def test_all_metrics_match_torch_transcription_of_uncrtaints():
    pred, target = _pair(3, shape=(20, 20, 5))
    pred = np.clip(pred, 0, 1)
    ours = _as_float(metrics.image_metrics(pred, target))
    ref = torch_reference_metrics(pred, target)
    for name in metrics.METRIC_NAMES:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------ PSNR / RMSE / MAE / SAM


def test_psnr_rmse_mae_match_skimage_and_numpy():
    pred, target = _pair(4)
    clipped = np.clip(pred, 0, 1)
    ours = _as_float(metrics.image_metrics(pred, target))
    mse = mean_squared_error(target.astype(np.float64), clipped.astype(np.float64))
    np.testing.assert_allclose(ours["rmse"], math.sqrt(mse), rtol=1e-5)
    np.testing.assert_allclose(
        ours["psnr"],
        peak_signal_noise_ratio(target.astype(np.float64), clipped.astype(np.float64), data_range=1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(ours["mae"], np.mean(np.abs(clipped - target), dtype=np.float64), rtol=1e-5)


def test_sam_matches_float64_reference():
    pred, target = _pair(5)
    p, t = np.clip(pred, 0, 1).astype(np.float64), target.astype(np.float64)
    cos = np.sum(p * t, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    ref = np.degrees(np.arccos(np.clip(cos, -1, 1))).mean()
    np.testing.assert_allclose(float(metrics.image_metrics(pred, target)["sam"]), ref, rtol=1e-4, atol=2e-3)


def test_identical_images():
    _, target = _pair(6)
    m = _as_float(metrics.image_metrics(target, target))
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["sam"] == pytest.approx(0.0, abs=1e-6)
    assert m["psnr"] == math.inf
    assert m["rmse"] == 0.0 and m["mae"] == 0.0


def test_sam_hand_cases():
    target = np.zeros((4, 6, 3), np.float32)
    target[..., 1] = 0.5
    orthogonal = np.zeros_like(target)
    orthogonal[..., 0] = 0.7
    assert float(metrics.image_metrics(orthogonal, target)["sam"]) == pytest.approx(90.0, abs=1e-4)
    # (0.3, 0.3, 0) vs (0, 0.5, 0) is 45 degrees; half the image at 45 and half identical -> 22.5
    half = target.copy()
    half[:2] = [0.3, 0.3, 0.0]
    assert float(metrics.image_metrics(half, target)["sam"]) == pytest.approx(22.5, abs=1e-4)
    # a scaled spectrum has zero angle
    assert float(metrics.image_metrics(target * 0.5, target)["sam"]) == pytest.approx(0.0, abs=0.05)


def test_sam_zero_vector_is_nan_like_theirs():
    pred, target = _pair(7)
    target[3, 4] = 0.0
    m = _as_float(metrics.image_metrics(pred, target))
    assert math.isnan(m["sam"])
    assert all(math.isfinite(m[k]) for k in ("psnr", "ssim", "mae", "rmse"))
    mask = np.ones(target.shape[:2], bool)
    mask[3, 4] = False  # leaving the zero pixel out of a masked evaluation makes SAM finite again
    assert math.isfinite(float(metrics.image_metrics(pred, target, mask)["sam"]))


def test_constant_offset():
    rng = np.random.default_rng(8)
    target = rng.uniform(0.2, 0.8, (16, 16, 3)).astype(np.float32)
    m = _as_float(metrics.image_metrics(target + 0.1, target))
    assert m["rmse"] == pytest.approx(0.1, rel=1e-4)
    assert m["mae"] == pytest.approx(0.1, rel=1e-4)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-3)


def test_known_small_example():
    target = np.full((2, 2, 2), 0.5, np.float32)
    pred = target.copy()
    pred[0, 0, 1] = 0.9  # one of 8 values off by 0.4
    m = _as_float(metrics.image_metrics(pred, target))
    assert m["rmse"] == pytest.approx(math.sqrt(0.16 / 8), rel=1e-5)
    assert m["psnr"] == pytest.approx(20 * math.log10(1 / math.sqrt(0.02)), rel=1e-5)
    assert m["mae"] == pytest.approx(0.05, rel=1e-5)
    angle = math.degrees(math.atan2(0.9, 0.5)) - 45.0  # one pixel of four
    assert m["sam"] == pytest.approx(angle / 4, rel=1e-4)


def test_predictions_are_clipped_first():
    pred, target = _pair(9, noise=0.3)
    assert pred.min() < 0 and pred.max() > 1
    clipped = _as_float(metrics.image_metrics(pred, target))
    np.testing.assert_allclose(
        list(clipped.values()), list(_as_float(metrics.image_metrics(np.clip(pred, 0, 1), target)).values()),
        rtol=1e-6,
    )
    raw = _as_float(metrics.image_metrics(pred, target, clip=False))
    assert raw["rmse"] > clipped["rmse"]
    unclipped_rmse = np.sqrt(np.mean((pred - target) ** 2, dtype=np.float64))
    np.testing.assert_allclose(raw["rmse"], unclipped_rmse, rtol=1e-5)


# ------------------------------------------------------------------------------------------ masks, batches


def test_masked_metrics_match_reference():
    pred, target = _pair(10)
    mask = np.zeros(target.shape[:2], bool)
    mask[4:15, 6:20] = True
    mask[0, 0] = True
    p = np.clip(pred, 0, 1).astype(np.float64)
    t = target.astype(np.float64)
    m = _as_float(metrics.image_metrics(pred, target, mask))
    rmse = np.sqrt(np.mean((p[mask] - t[mask]) ** 2))  # EMRDM's RMSE_cloudy: masked pixels, all bands
    np.testing.assert_allclose(m["rmse"], rmse, rtol=1e-5)
    np.testing.assert_allclose(m["psnr"], 20 * np.log10(1 / rmse), rtol=1e-5)
    np.testing.assert_allclose(m["mae"], np.mean(np.abs(p[mask] - t[mask])), rtol=1e-5)
    cos = np.sum(p * t, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(m["sam"], np.degrees(np.arccos(np.clip(cos, -1, 1)))[mask].mean(), rtol=1e-4)
    np.testing.assert_allclose(m["ssim"], scipy_ssim_map(p, t)[mask].mean(), atol=2e-5)
    # a full mask is the unmasked evaluation; (H, W, 1) masks are accepted
    full = _as_float(metrics.image_metrics(pred, target, np.ones((*mask.shape, 1), bool)))
    for name, value in _as_float(metrics.image_metrics(pred, target)).items():
        assert full[name] == pytest.approx(value, rel=1e-5)


def test_empty_mask_gives_nan():
    pred, target = _pair(11)
    m = _as_float(metrics.image_metrics(pred, target, np.zeros(target.shape[:2], bool)))
    assert all(math.isnan(v) for v in m.values()), m


def test_batch_equals_per_image_loop_and_jits():
    pairs = [_pair(20 + i) for i in range(3)]
    pred = np.stack([p for p, _ in pairs])
    target = np.stack([t for _, t in pairs])
    mask = np.random.default_rng(0).uniform(size=target.shape[:3]) > 0.4
    batched = jax.jit(metrics.batch_metrics, static_argnames="clip")
    for m in (None, mask):
        out = batched(pred, target, m)
        for name in metrics.METRIC_NAMES:
            assert out[name].shape == (3,) and out[name].dtype == jnp.float32
            loop = [float(metrics.image_metrics(pred[i], target[i], None if m is None else m[i])[name])
                    for i in range(3)]
            np.testing.assert_allclose(np.asarray(out[name]), loop, rtol=1e-5, err_msg=name)


def test_cloudy_mask():
    prob = np.array([[0.1, 0.6], [0.5, 0.9]], np.float32)[..., None]
    np.testing.assert_array_equal(np.asarray(metrics.cloudy_mask(prob)), [[False, True], [False, True]])
    np.testing.assert_array_equal(np.asarray(metrics.cloudy_mask(prob[..., 0], 0.05)), np.ones((2, 2), bool))


def test_bad_shapes_raise_clear_errors():
    pred, target = _pair(12)
    with pytest.raises(ValueError, match="differs from target"):
        metrics.image_metrics(pred[:-1], target)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        metrics.image_metrics(pred[None], target[None])
    with pytest.raises(ValueError, match="mask must have shape"):
        metrics.image_metrics(pred, target, np.ones((3, 3), bool))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        metrics.batch_metrics(pred, target)


# ------------------------------------------------------------------------------------------ running mean


def test_running_mean_skips_nan_per_metric_and_counts():
    acc = metrics.RunningMean()
    acc.update({"psnr": 30.0, "sam": 4.0})
    acc.update({"psnr": np.array([20.0, 40.0]), "sam": jnp.array([np.nan, 8.0])})
    assert acc.num_images == 3
    assert acc.counts == {"psnr": 3, "sam": 2}
    assert acc.mean() == {"psnr": pytest.approx(30.0), "sam": pytest.approx(6.0)}
    other = metrics.RunningMean()
    other.update({"psnr": math.inf, "sam": np.nan})
    acc.merge(other)
    assert acc.num_images == 4 and acc.counts == {"psnr": 4, "sam": 2}
    assert acc.mean()["psnr"] == math.inf  # as theirs: a perfect image makes the mean PSNR inf
    only_nan = metrics.RunningMean()
    only_nan.update({"sam": [np.nan]})
    assert math.isnan(only_nan.mean()["sam"]) and only_nan.counts["sam"] == 0
    with pytest.raises(ValueError, match="different numbers of images"):
        acc.update({"psnr": [1.0, 2.0], "sam": [1.0]})


def test_running_mean_of_batch_metrics_is_mean_over_images():
    pairs = [_pair(30 + i, shape=(16, 16, 3)) for i in range(4)]
    pred = np.stack([p for p, _ in pairs])
    target = np.stack([t for _, t in pairs])
    acc = metrics.RunningMean()
    acc.update(metrics.batch_metrics(pred[:3], target[:3]))
    acc.update(metrics.image_metrics(pred[3], target[3]))
    per_image = metrics.batch_metrics(pred, target)
    for name in metrics.METRIC_NAMES:
        np.testing.assert_allclose(acc.mean()[name], float(jnp.mean(per_image[name])), rtol=1e-6)


# ------------------------------------------------------------------------------------------ real data


def _read_s2(path: Path) -> np.ndarray:
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(path) as src:
        dn = src.read().astype(np.float32)
    return np.moveaxis(np.clip(dn, 0, 10000) / 10000.0, 0, -1)


def test_real_sen12mscr_cloudy_vs_clear_matches_references():
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"SEN12MS-CR sample not found at {SAMPLE_DIR}")
    clear = sorted(SAMPLE_DIR.glob("*_s2/s2_*/*.tif"))
    if not clear:
        pytest.skip(f"no S2 GeoTIFFs under {SAMPLE_DIR}")
    for clear_path in clear:
        season_dir, scene_dir = clear_path.parent.parent.name, clear_path.parent.name  # ..._s2, s2_139
        cloudy_path = (
            SAMPLE_DIR / f"{season_dir}_cloudy" / scene_dir.replace("s2_", "s2_cloudy_")
            / clear_path.name.replace("_s2_", "_s2_cloudy_")
        )
        target, pred = _read_s2(clear_path), _read_s2(cloudy_path)
        assert target.shape == (256, 256, 13)
        ours = _as_float(metrics.image_metrics(pred, target))
        ref = torch_reference_metrics(pred, target)
        for name in metrics.METRIC_NAMES:
            np.testing.assert_allclose(
                ours[name], ref[name], rtol=2e-4, atol=1e-5, err_msg=f"{clear_path.name} {name}"
            )
        np.testing.assert_allclose(
            ours["psnr"], peak_signal_noise_ratio(target, pred, data_range=1.0), rtol=1e-4
        )


def test_matmul_blur_is_the_zero_padded_gaussian_filter():
    """The training loss's blur (banded matmuls) equals the metrics' convolution up to float32 rounding."""
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (23, 17, 3)), jnp.float32)
    np.testing.assert_allclose(metrics.gaussian_blur_matmul(x), metrics._gaussian_blur(x), atol=1e-6)
    pred, target = _pair(5)
    np.testing.assert_allclose(metrics.ssim_map(pred, target, blur=metrics.gaussian_blur_matmul),
                               metrics.ssim_map(pred, target), atol=1e-4)
