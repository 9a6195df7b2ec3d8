"""The pixel-space refiner: residual and trust-mask semantics, the SAR-absent mode, its loss, and sampling
with it (the cloudy-source flow starts from the cloudy latent)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crrf_jax import flow as rf
from crrf_jax import inference, sampling, train_lib
from crrf_jax.models.refiner import Refiner, RefinerConfig, blend

B, H, W, C = 2, 16, 16, 5


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    pred, cloudy = (jnp.asarray(rng.uniform(0, 1, (B, H, W, C)), jnp.float32) for _ in range(2))
    prob = jnp.asarray(rng.uniform(0, 1, (B, H, W, 1)), jnp.float32)
    sar = jnp.asarray(rng.uniform(0, 1, (B, H, W, 2)), jnp.float32)
    return pred, cloudy, prob, sar


def _refiner(seed: int = 0) -> Refiner:
    return Refiner(RefinerConfig(bands=C, width=8, dilations=(1, 2)), rngs=nnx.Rngs(seed))


def _set_head(model: Refiner, residual: float, trust_logit: float) -> None:
    """A head whose output is constant: `residual` on every band, `trust_logit` for the mask."""
    model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
    model.head.bias[...] = jnp.asarray([residual] * C + [trust_logit], jnp.float32)


def test_initial_refiner_averages_prediction_and_input():
    """Zero-initialised head: residual 0 and trust 1/2."""
    pred, cloudy, prob, sar = _inputs()
    refined, trust = _refiner()(pred, cloudy, prob, sar)
    np.testing.assert_allclose(trust, 0.5, atol=1e-7)
    np.testing.assert_allclose(refined, 0.5 * (pred + cloudy), atol=1e-6)


@pytest.mark.parametrize("residual", [0.0, 0.1])
def test_trust_one_keeps_the_input_and_trust_zero_takes_the_restored_prediction(residual):
    pred, cloudy, prob, sar = _inputs(1)
    model = _refiner()
    _set_head(model, residual, 40.0)  # sigmoid(40) == 1 in float32
    refined, trust = model(pred, cloudy, prob, sar)
    assert float(trust.min()) == 1.0
    np.testing.assert_array_equal(refined, cloudy)
    _set_head(model, residual, -40.0)
    refined, trust = model(pred, cloudy, prob, sar)
    np.testing.assert_allclose(trust, 0.0, atol=1e-12)
    np.testing.assert_allclose(refined, pred + residual, atol=1e-6)


def test_gain_scales_the_kept_pixel_alike_in_every_band():
    """With `gain`, a trusted pixel comes back as g * cloudy: every band scaled by one factor, so its
    spectral angle is the input's; g = 1 at initialisation (the output is then the gain-less refiner's)."""
    pred, cloudy, prob, sar = _inputs(12)
    plain = _refiner()
    model = Refiner(RefinerConfig(bands=C, width=8, dilations=(1, 2), gain=True), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model(pred, cloudy, prob, sar)[0], plain(pred, cloudy, prob, sar)[0], atol=1e-6)
    model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
    model.head.bias[...] = jnp.asarray([0.0] * C + [40.0, 0.5], jnp.float32)  # trust 1, log-gain logit 0.5
    refined, _ = model(pred, cloudy, prob, sar)
    np.testing.assert_allclose(refined, cloudy * np.exp(2 * np.tanh(0.25)), rtol=1e-6)  # one factor, all bands


def test_blend_is_a_per_pixel_convex_combination():
    pred, cloudy, prob, _ = _inputs(2)
    out = blend(pred, cloudy, prob)
    np.testing.assert_allclose(out, prob * cloudy + (1 - prob) * pred, atol=1e-7)
    lo, hi = jnp.minimum(pred, cloudy), jnp.maximum(pred, cloudy)
    assert bool(jnp.all((out >= lo - 1e-6) & (out <= hi + 1e-6)))


def test_sar_absent_per_sample_equals_no_sar():
    """sar_present=False for a sample gives exactly its output with sar=None, and SAR matters otherwise."""
    pred, cloudy, prob, sar = _inputs(3)
    model = _refiner(4)
    model.head.kernel[...] = 0.1 * jax.random.normal(jax.random.key(0), model.head.kernel.shape)
    none, _ = model(pred, cloudy, prob, None)
    mixed, _ = model(pred, cloudy, prob, sar, jnp.array([False, True]))
    full, _ = model(pred, cloudy, prob, sar)
    np.testing.assert_allclose(mixed[0], none[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], full[1], atol=1e-6)
    assert float(jnp.abs(full[1] - none[1]).max()) > 1e-4


def test_refiner_rejects_mismatched_inputs():
    pred, cloudy, prob, sar = _inputs()
    model = _refiner()
    with pytest.raises(ValueError, match="must both be"):
        model(pred, cloudy[..., :3], prob, sar)
    with pytest.raises(ValueError, match="cloud_prob must be"):
        model(pred, cloudy, prob[:, :8], sar)
    with pytest.raises(ValueError, match="sar must be"):
        model(pred, cloudy, prob, sar[..., :1])


def _dates(seed: int, t: int = 3):
    """T dates of (B, T, H, W, .) cloudy images, cloud probabilities and SAR."""
    rng = np.random.default_rng(seed)
    cloudy = jnp.asarray(rng.uniform(0, 1, (B, t, H, W, C)), jnp.float32)
    prob = jnp.asarray(rng.uniform(0, 1, (B, t, H, W, 1)), jnp.float32)
    sar = jnp.asarray(rng.uniform(0, 1, (B, t, H, W, 2)), jnp.float32)
    return cloudy, prob, sar


def _date_refiner(dates: int = 3, seed: int = 5) -> Refiner:
    """A refiner for several dates with a random head (a zero head would hide what the inputs do)."""
    model = Refiner(RefinerConfig(bands=C, width=8, dilations=(1, 2), dates=dates), rngs=nnx.Rngs(seed))
    model.head.kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed), model.head.kernel.shape)
    return model


def test_one_date_refiner_keeps_the_single_image_inputs():
    """dates=1 (every single-image model) has the single-image input channels, so its checkpoints load as
    before; each further date adds its image, cloud probability and flag."""
    assert RefinerConfig(bands=C).in_channels == 2 * C + 1 + 2 + 1
    assert RefinerConfig(bands=C, dates=3).in_channels == 2 * C + 1 + 2 + 1 + 3 * (C + 2)


def test_several_dates_blend_the_composite_and_every_date_counts():
    """The trust mask keeps the least-cloudy composite's pixel, and every date, seen on its own, moves the
    restored part."""
    from crrf_jax import temporal

    pred = _inputs(6)[0]
    cloudy, prob, sar = _dates(7)
    model = _date_refiner()
    out, trust = model(pred, cloudy, prob, sar)
    composite = temporal.composite(cloudy, prob)
    restored = (out - trust * composite) / (1 - trust)  # blend inverted: pred + residual
    assert float(jnp.abs(restored - pred).max()) > 1e-3
    for k in range(3):  # a date changed where it is not the least cloudy one still changes the output
        index = temporal.least_cloudy_index(prob)
        other = jnp.where((index != k)[:, None, :, :, None] & (jnp.arange(3) == k)[None, :, None, None, None],
                          1.0 - cloudy, cloudy)
        np.testing.assert_array_equal(temporal.composite(other, prob), composite)
        moved, _ = model(pred, other, prob, sar)
        assert float(jnp.abs(moved - out).max()) > 1e-4, f"date {k} does not reach the output"


def test_fewer_dates_equal_absent_dates_whatever_they_hold():
    """T=2 dates given equal T=3 with the third date absent, whatever it holds; an absent date is left out
    of the composite too."""
    pred = _inputs(8)[0]
    cloudy, prob, sar = _dates(9)
    model = _date_refiner()
    two, _ = model(pred, cloudy[:, :2], prob[:, :2], sar[:, :2])
    garbage = cloudy.at[:, 2].set(1.0), prob.at[:, 2].set(0.0), sar.at[:, 2].set(0.0)  # clearest, if present
    present = jnp.array([[True, True, False]] * B)
    three, _ = model(pred, *garbage, present=present)
    np.testing.assert_allclose(three, two, atol=1e-6)
    everything, _ = model(pred, *garbage)
    assert float(jnp.abs(everything - two).max()) > 1e-3


def test_refiner_refuses_too_many_dates_and_bad_masks():
    pred = _inputs(10)[0]
    cloudy, prob, sar = _dates(11, t=3)
    with pytest.raises(ValueError, match="at most dates=2"):
        _date_refiner(dates=2)(pred, cloudy, prob, sar)
    with pytest.raises(ValueError, match="present must be"):
        _date_refiner()(pred, cloudy, prob, sar, present=jnp.ones((B, 2), bool))
    with pytest.raises(ValueError, match="cloud_prob must be"):
        _date_refiner()(pred, cloudy, prob[:, :2], sar)


def test_refiner_loss_gradients_reach_the_refiner_only():
    """The loss of the roundtrip input: finite, with gradients for the refiner; the frozen VAE gets none."""
    from configs import demo
    from crrf_jax.models import build

    config = demo.get_config()
    config.model.vae_s2.in_channels = config.model.vae_s2.out_ch = C
    config.model.refiner.bands = C
    vae_s2 = build.autoencoder(config.model, "vae_s2")
    vae_s1 = build.autoencoder(config.model, "vae_s1")
    flow_model = build.cloud_removal_flux(config.model)
    nets = sampling.Networks.of(flow_model, vae_s2, vae_s1)
    refiner = build.refiner(config.model)
    pred, cloudy, prob, sar = _inputs(5)
    batch = {"s2": pred, "s2_cloudy": cloudy, "cloud_prob": prob, "s1": sar}
    cfg = train_lib.RefinerLossConfig(input="roundtrip")
    graph, params = nnx.split(refiner)

    def loss(p):
        return train_lib.refiner_loss(nnx.merge(graph, p), batch, jax.random.key(0), nets, cfg=cfg)[0]

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    assert float(jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.abs(g)), grads, 0.0)) > 0


def test_cloudy_source_sampler_starts_from_the_cloudy_latent():
    """A flow whose velocity is zero (zero-initialised output layer) leaves the sampler where it starts: with
    the cloudy source and sigma 0 that is the cloudy image's VAE round trip; with the noise source it is not."""
    from configs import demo
    from crrf_jax.models import build
    from crrf_jax.models.flux import CloudRemovalFlux

    config = demo.get_config()
    vae_s2 = build.autoencoder(config.model, "vae_s2", seed=1)
    vae_s1 = build.autoencoder(config.model, "vae_s1", seed=2)
    flow_model = CloudRemovalFlux(config.model.flux.to_dict(), config.model.cloud_cnn.to_dict(), zero_init=True)
    nets = sampling.Networks.of(flow_model, vae_s2, vae_s1)
    rng = np.random.default_rng(0)
    cloudy = jnp.asarray(rng.uniform(0, 1, (1, 32, 32, 13)), jnp.float32)
    prob = jnp.asarray(rng.uniform(0, 1, (1, 32, 32, 1)), jnp.float32)
    keys = jax.random.split(jax.random.key(3), 1)
    roundtrip = (vae_s2.decode(vae_s2.encode(cloudy * 2 - 1)) + 1) / 2
    for steps in (1, 4):
        out, _ = sampling.sample_patches(nets, cloudy, None, prob, keys, steps=steps,
                                          spec=rf.FlowSpec("cloudy", 0.0))
        np.testing.assert_allclose(out, roundtrip, atol=1e-5)
    noise_out, _ = sampling.sample_patches(nets, cloudy, None, prob, keys, steps=1, spec=rf.FlowSpec("noise"))
    assert float(jnp.abs(noise_out - roundtrip).max()) > 1e-2


def test_keep_clear_pixels_come_back_as_they_came_in():
    rng = np.random.default_rng(6)
    mean, std, cloudy = (rng.uniform(0, 1, (8, 8, 3)).astype(np.float32) for _ in range(3))
    prob = rng.uniform(0, 1, (8, 8, 1)).astype(np.float32)
    kept_mean, kept_std = inference.keep_clear_pixels(mean, std, cloudy, prob, 0.4)
    clear = prob[..., 0] < 0.4
    np.testing.assert_array_equal(kept_mean[clear], cloudy[clear])
    np.testing.assert_array_equal(kept_std[clear], 0.0)
    np.testing.assert_array_equal(kept_mean[~clear], mean[~clear])
    with pytest.raises(ValueError, match="keep_clear must be a cloud probability"):
        inference.keep_clear_pixels(mean, std, cloudy, prob, 1.5)
