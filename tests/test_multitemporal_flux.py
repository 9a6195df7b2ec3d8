"""CloudRemovalFlux with several cloudy dates: T = 1 is the single-image model, absent dates are exactly
absent, date order and every date's content matter, one model serves any T up to max_dates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import cloud_cnn_config, flux_config
from crrf_jax.models.flux import CloudRemovalFlux

B, H, W, Z, T = 2, 4, 4, 16, 3  # latent sizes; pixels are 8x larger


def model(max_dates: int) -> CloudRemovalFlux:
    return CloudRemovalFlux(flux_config("tiny"), cloud_cnn_config("tiny"), max_dates=max_dates, rngs=nnx.Rngs(0))


def inputs(seed: int = 0, dates: int = T) -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.key(seed), 5)
    return {
        "x_t": jax.random.normal(k[0], (B, H, W, Z)),
        "t": jnp.array([0.3, 0.8]),
        "cloudy_latent": jax.random.normal(k[1], (B, dates, H, W, Z)),
        "sar_latent": jax.random.normal(k[2], (B, dates, H, W, Z)),
        "cloud_prob": jax.random.uniform(k[3], (B, dates, 8 * H, 8 * W, 1)),
    }


@nnx.jit
def forward(m, x, dates=None):
    return m(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"], dates=dates)


@pytest.fixture(scope="module")
def mt():
    return model(T)


def test_one_date_is_the_single_image_model():
    single, x = model(1), inputs(dates=1)
    flat = {k: (v[:, 0] if k in ("cloudy_latent", "sar_latent", "cloud_prob") else v) for k, v in x.items()}
    np.testing.assert_array_equal(np.asarray(forward(single, x)), np.asarray(forward(single, flat)))
    # An all-present date mask changes nothing but float reassociation.
    np.testing.assert_allclose(np.asarray(forward(single, x, jnp.ones((B, 1), bool))),
                               np.asarray(forward(single, flat)), atol=1e-5)


def test_a_masked_date_is_exactly_absent(mt):
    x = inputs()
    dates = jnp.array([[True, True, False], [True, True, False]])
    masked = np.asarray(forward(mt, x, dates))
    two = {k: (v[:, :2] if v.ndim == 5 or k == "cloud_prob" else v) for k, v in x.items()}
    np.testing.assert_allclose(masked, np.asarray(forward(mt, two)), atol=2e-5)  # T = 2 served by max_dates=3
    # Whatever the masked date holds, the prediction is the same.
    noise = jax.random.normal(jax.random.key(9), x["cloudy_latent"].shape[:1] + x["cloudy_latent"].shape[2:])
    other = dict(x, cloudy_latent=x["cloudy_latent"].at[:, 2].set(noise), sar_latent=x["sar_latent"].at[:, 2].set(-noise),
                 cloud_prob=x["cloud_prob"].at[:, 2].set(1.0))
    np.testing.assert_allclose(np.asarray(forward(mt, other, dates)), masked, atol=1e-5)


def test_every_present_date_and_the_order_matter(mt):
    x = inputs()
    base = np.asarray(forward(mt, x))
    for k in range(T):
        bumped = dict(x, cloudy_latent=x["cloudy_latent"].at[:, k].add(1.0))
        assert np.abs(np.asarray(forward(mt, bumped)) - base).max() > 1e-3, f"date {k} has no effect"
    swapped = {key: (v[:, ::-1] if v.ndim == 5 else v) for key, v in x.items()}
    assert np.abs(np.asarray(forward(mt, swapped)) - base).max() > 1e-3, "date order has no effect"


def test_too_many_dates_and_bad_masks_are_refused(mt):
    with pytest.raises(ValueError, match="at most max_dates=3"):
        mt(**{k: v for k, v in inputs(dates=4).items()})
    x = inputs()
    with pytest.raises(ValueError, match="dates must be"):
        mt(**x, dates=jnp.ones((B, 2), bool))
    with pytest.raises(ValueError, match="cloud_prob must be"):
        mt(**dict(x, cloud_prob=x["cloud_prob"][:, :2]))
