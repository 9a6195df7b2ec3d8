"""EMRDM's 8-bit PSNR / SSIM (crrf_jax/rgb_metrics.py) against scikit-image, the library EMRDM's CUHK-CR
evaluator calls (sgm/modules/learning/evaluator.py), on random images; LPIPS is in tests/test_lpips.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from crrf_jax import rgb_metrics as RM


def _uint8(x: np.ndarray) -> np.ndarray:
    """EMRDM's map in NumPy float32: ((x * 2 - 1) + 1) * 127.5, clamped to [0, 255], cast to uint8."""
    x = x.astype(np.float32)
    return np.clip(((x * np.float32(2) - np.float32(1)) + np.float32(1)) * np.float32(127.5), 0, 255).astype(np.uint8)


def _skimage(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """EMRDM's PSNR and SSIM of one (H, W, C) pair: grey SSIM of the RGB image, or the mean over channels each
    repeated to 3 (its 4-channel branch)."""
    a, b = _uint8(pred), _uint8(target)
    psnr = peak_signal_noise_ratio(b, a, data_range=255)

    def grey(x):
        return np.tensordot(x, list(RM.LUMA), axes=1)

    if a.shape[-1] == 3:
        ssim = structural_similarity(grey(a), grey(b), data_range=255)
    else:
        ssim = np.mean([structural_similarity(grey(np.repeat(a[..., c:c + 1], 3, -1)),
                                              grey(np.repeat(b[..., c:c + 1], 3, -1)), data_range=255)
                        for c in range(a.shape[-1])])
    return psnr, ssim


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("noise", [0.01, 0.3])  # near-identical (SSIM ~ 1) and far apart
def test_matches_skimage(channels, noise):
    rng = np.random.default_rng(channels + int(noise * 100))
    target = rng.random((3, 48, 40, channels), dtype=np.float32)
    target[0] = np.round(target[0] * 255) / 255  # an 8-bit image, as CUHK-CR's targets are
    pred = (target + noise * rng.standard_normal(target.shape)).astype(np.float32)  # leaves [0, 1], clamped
    got = jax.jit(RM.batch_metrics_255)(jnp.asarray(pred), jnp.asarray(target))
    assert set(got) == set(RM.METRIC_NAMES) and got["psnr_255"].shape == (3,)
    for i in range(3):
        psnr, ssim = _skimage(pred[i], target[i])
        np.testing.assert_allclose(got["psnr_255"][i], psnr, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["ssim_255"][i], ssim, rtol=0, atol=2e-6)


def test_uint8_map_truncates_like_a_cast():
    x = np.concatenate([np.arange(256) / 255, np.linspace(-0.2, 1.2, 4001), [0.5 / 255, 254.99 / 255]])
    x = x.astype(np.float32)
    for to_uint8 in (RM.to_uint8, jax.jit(RM.to_uint8)):  # under jit too (XLA would fold it into x * 255)
        got = np.asarray(to_uint8(x))
        np.testing.assert_array_equal(got, _uint8(x).astype(np.float32))
        assert got[-2] == 0 and got[-1] == 254  # truncation, not rounding
        assert got[1] == 0 and got[63] == 62 and got[64] == 64  # k / 255 -> k - 1 for k = 1..63, as in EMRDM


def test_identical_images_and_constant_channels():
    rng = np.random.default_rng(0)
    x = rng.random((1, 16, 16, 4), dtype=np.float32)
    metrics = jax.jit(RM.batch_metrics_255)
    out = metrics(jnp.asarray(x), jnp.asarray(x))
    assert out["psnr_255"][0] == np.inf and out["ssim_255"][0] == pytest.approx(1.0, abs=1e-6)
    flat = np.full((1, 16, 16, 3), 0.5, np.float32)  # zero variance: SSIM from the means and constants only
    out = metrics(jnp.asarray(flat), jnp.asarray(flat * 0.5))
    np.testing.assert_allclose(out["ssim_255"][0], _skimage(flat[0], flat[0] * 0.5)[1], atol=1e-6)


def test_channels_from_band_names():
    assert RM.emrdm_channels(("B04", "B03", "B02", "B08")) == (0, 1, 2, 3)  # CUHK-CR / Sen2_MTC_New: R, G, B, NIR
    assert RM.emrdm_channels(("B02", "B03", "B04")) == (2, 1, 0)
    assert RM.emrdm_channels(tuple(f"B{i:02d}" for i in range(1, 9))) == (3, 2, 1, 7)
    with pytest.raises(ValueError, match="lack B03"):
        RM.emrdm_channels(("B04", "B02", "B08"))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        RM.batch_metrics_255(jnp.zeros((8, 8, 3)), jnp.zeros((8, 8, 3)))


def _sen2mtc_pairs(seed: int = 5, batch: int = 4, size: tuple[int, int] = (24, 20)):
    """(pred, target) R, G, B batches on [0, 1] = DN / 10000: targets of integer DN up to 3000 (past the 2000
    clip), predictions = targets + noise, unclipped (a little below 0); image 2's prediction is constant (EMRDM's
    all-ones branch), image 3's target has a pixel whose 3 stretched values are 0 (SAM NaN)."""
    rng = np.random.default_rng(seed)
    target = (rng.integers(100, 3001, (batch, *size, 3)) / np.float32(10000)).astype(np.float32)
    pred = (target + 0.02 * rng.standard_normal(target.shape) - 0.005).astype(np.float32)
    pred[2] = 0.1234
    target[3, 0, 0] = 0.0
    return pred, target


def test_x_times_2_minus_1_is_emrdms_normalisation():
    x = np.linspace(0, 1, 1_000_003, dtype=np.float32)  # sen_mtc_stretch's v = x * 2 - 1 is EMRDM's (x - 0.5) / 0.5
    np.testing.assert_array_equal(x * np.float32(2) - np.float32(1), (x - np.float32(0.5)) / np.float32(0.5))


def test_sen2mtc_matches_emrdm_reference():
    torch = pytest.importorskip("torch")
    from tests.helpers import emrdm_sen2mtc as EMRDM  # the reference, re-typed from EMRDM's source

    pred, target = _sen2mtc_pairs()
    stretch = jax.jit(jax.vmap(RM.sen_mtc_stretch))
    for x in (pred, target):  # the stretched images themselves, bit for bit
        expected = EMRDM.sen_mtc_scale_01((torch.from_numpy(x).permute(0, 3, 1, 2) - 0.5) / 0.5)
        np.testing.assert_array_equal(np.asarray(stretch(jnp.asarray(x))), expected.permute(0, 2, 3, 1).numpy())
    got = jax.jit(RM.batch_metrics_sen2mtc)(jnp.asarray(pred), jnp.asarray(target))
    assert set(got) == set(RM.SEN2MTC_METRIC_NAMES) and got["psnr_mtc"].shape == (4,)
    for i in range(4):
        ref = EMRDM.score(target[i], pred[i])
        for name, key, atol in (("psnr", "PSNR", 1e-4), ("ssim", "SSIM", 1e-5), ("sam", "SAM", 1e-3),
                                ("mae", "MAE", 1e-6), ("rmse", "RMSE", 1e-6)):
            np.testing.assert_allclose(got[f"{name}_mtc"][i], ref[key], rtol=1e-5, atol=atol, err_msg=f"{i} {name}")
    assert np.isnan(got["sam_mtc"][3]) and np.all(np.isfinite(got["sam_mtc"][:3]))
    same = jax.jit(RM.batch_metrics_sen2mtc)(jnp.asarray(target), jnp.asarray(target))
    assert np.all(same["psnr_mtc"] == np.inf) and np.allclose(same["ssim_mtc"], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        RM.batch_metrics_sen2mtc(jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 4)))


def test_sen2mtc_channels_are_rgb_only():
    assert RM.emrdm_channels(("B04", "B03", "B02", "B08"), nir=False) == (0, 1, 2)
    scorer = RM.Sen2MTCScorer(("B08", "B02", "B03", "B04"))
    assert scorer.channels == (3, 2, 1) and scorer.bands == ["B04", "B03", "B02"]
    assert scorer.metric_names == RM.SEN2MTC_METRIC_NAMES
    with pytest.raises(ValueError, match="metric set 'sen2mtc'.*lack B04"):
        RM.Sen2MTCScorer(("B03", "B02", "B08"))
