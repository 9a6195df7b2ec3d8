"""AutoEncoder behaviour: shapes for any band count, latent scaling, the posterior, dtypes and input checks.

Numerical parity with diffusers lives in test_autoencoder_parity.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import autoencoder_config
from crrf_jax.models.autoencoder import AutoEncoder, AutoEncoderConfig, DiagonalGaussian, LatentStat
from crrf_jax.parallel import LOGICAL_AXIS_RULES


@nnx.jit
def _run(model: AutoEncoder, x: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    """Every entry point on the same input, in one XLA program (compiling once is much faster on CPU than
    op-by-op dispatch or one program per entry point)."""
    posterior = model.encode_posterior(x)
    z = model.encode(x)
    recon, _ = model(x, rng)
    recon_mean, _ = model(x)
    return dict(
        mean=posterior.mean,
        logvar=posterior.logvar,
        kl=posterior.kl(),
        z=z,
        z_sampled=model.encode(x, rng),
        decoded=model.decode(z),
        decoder_on_mean=model.decoder(posterior.mean),  # unscaled latents
        recon=recon,
        decoder_on_sample=model.decoder(posterior.sample(rng)),
        recon_mean=recon_mean,
    )


def _tiny(bands: int, **overrides) -> AutoEncoder:
    cfg = AutoEncoderConfig.from_mapping(autoencoder_config("tiny", bands))
    return AutoEncoder(dataclasses.replace(cfg, **overrides), rngs=nnx.Rngs(0))


def _images(bands: int, size: int = 32, batch: int = 2, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, bands), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def s2_model() -> AutoEncoder:
    return _tiny(13, scale_factor=0.6, shift_factor=0.25)


@pytest.fixture(scope="module")
def s2_out(s2_model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in _run(s2_model, _images(13), jax.random.key(1)).items()}


def test_config_from_common_configdict():
    cfg = AutoEncoderConfig.from_mapping(autoencoder_config("base", 13))
    got = (cfg.in_channels, cfg.out_ch, cfg.ch, cfg.ch_mult, cfg.norm_groups)
    assert got == (13, 13, 64, (1, 2, 4, 4), 32)
    assert cfg.downsample_factor == 8
    with pytest.raises(ValueError, match="unknown keys.*'bands'"):
        AutoEncoderConfig.from_mapping({"bands": 13})
    with pytest.raises(ValueError, match="norm_groups=32 does not divide.*16"):
        AutoEncoderConfig(ch=16, norm_groups=32)


def test_shapes_13_bands(s2_out):
    assert s2_out["z"].shape == (2, 4, 4, 16) and s2_out["z"].dtype == np.float32
    assert s2_out["mean"].shape == s2_out["logvar"].shape == (2, 4, 4, 16)
    assert s2_out["decoded"].shape == s2_out["recon"].shape == (2, 32, 32, 13)
    assert s2_out["decoded"].dtype == s2_out["recon"].dtype == np.float32


def test_scaling_is_applied_exactly(s2_out):
    np.testing.assert_allclose(s2_out["z"], 0.6 * (s2_out["mean"] - 0.25), rtol=1e-6, atol=1e-6)
    # decode inverts the scaling: decode(encode(x)) is the decoder on the posterior mean.
    np.testing.assert_allclose(s2_out["decoded"], s2_out["decoder_on_mean"], rtol=1e-5, atol=1e-5)
    # Training pass: the decoder sees an unscaled posterior sample (the mean without an rng).
    np.testing.assert_allclose(s2_out["recon"], s2_out["decoder_on_sample"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s2_out["recon_mean"], s2_out["decoder_on_mean"], rtol=1e-5, atol=1e-5)


def test_2_bands_and_latent_stats_replaceable_under_jit():
    model = _tiny(2)  # scale 1, shift 0 as configs/common.py sets them before the statistics are measured
    x, rng = _images(2, size=48), jax.random.key(0)
    before = _run(model, x, rng)
    assert before["z"].shape == (2, 6, 6, 16) and before["decoded"].shape == (2, 48, 48, 2)
    np.testing.assert_allclose(before["z"], before["mean"], rtol=1e-6, atol=1e-6)

    model.set_latent_stats(scale_factor=2.0, shift_factor=-0.5)
    after = _run(model, x, rng)  # same graph, new state: the jitted program sees the new factors
    np.testing.assert_allclose(after["z"], 2.0 * (before["mean"] + 0.5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after["decoded"], before["decoded"], rtol=1e-4, atol=1e-4)
    # The factors are non-trainable state: not in the Param state an optimiser sees, but saved with the model.
    assert "scale_factor" not in nnx.state(model, nnx.Param)
    stats = nnx.state(model, LatentStat)
    assert float(stats["scale_factor"].get_value()) == 2.0
    assert float(stats["shift_factor"].get_value()) == -0.5
    with pytest.raises(ValueError, match="non-zero"):
        model.set_latent_stats(0.0, 0.0)


def test_posterior_kl_and_sampling(s2_model, s2_out):
    zeros = jnp.zeros((3, 4, 4, 16))
    np.testing.assert_allclose(DiagonalGaussian(mean=zeros, logvar=zeros).kl(), np.zeros(3), atol=1e-7)

    kl = s2_out["kl"]
    assert kl.shape == (2,) and np.all(kl > 0)
    # KL of N(m, s^2) from N(0, 1) per element, summed.
    m, lv = s2_out["mean"].astype(np.float64), s2_out["logvar"].astype(np.float64)
    np.testing.assert_allclose(kl, 0.5 * (m**2 + np.exp(lv) - 1 - lv).sum(axis=(1, 2, 3)), rtol=1e-5)

    posterior = DiagonalGaussian(mean=jnp.asarray(s2_out["mean"]), logvar=jnp.asarray(s2_out["logvar"]))
    a, b = posterior.sample(jax.random.key(0)), posterior.sample(jax.random.key(1))
    assert a.shape == posterior.mean.shape
    assert not np.allclose(a, posterior.mean) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, posterior.sample(jax.random.key(0)))
    eps = (a - posterior.mean) / posterior.std  # standard normal noise
    assert abs(float(eps.mean())) < 0.15 and 0.85 < float(eps.std()) < 1.15
    assert posterior.mode() is posterior.mean
    # encode with an rng scales a posterior sample instead of the mean.
    eps_z = (s2_out["z_sampled"] - s2_out["z"]) / (0.6 * np.exp(0.5 * lv))
    assert 0.85 < float(eps_z.std()) < 1.15


def test_logvar_is_clamped():
    moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 100.0)], axis=-1)
    posterior = DiagonalGaussian.from_moments(moments)
    assert float(posterior.logvar.max()) == 20.0 and bool(jnp.isfinite(posterior.kl()).all())


def test_bfloat16_compute(s2_model, s2_out):
    model = AutoEncoder(s2_model.config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(s2_model))
    out = _run(model, _images(13), jax.random.key(1))
    for name in ("z", "decoded"):
        low, ref = out[name], s2_out[name]
        assert low.dtype == jnp.float32 and bool(jnp.isfinite(low).all()), name
        # bfloat16 keeps ~3 significant digits: close to float32, but not equal.
        rel = float(jnp.abs(low - ref).max() / np.abs(ref).max())
        assert 0 < rel < 0.1, (name, rel)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_bad_inputs_give_clear_errors(s2_model):
    with pytest.raises(ValueError, match="multiples of 8.*36x32"):
        s2_model.encode(jnp.zeros((1, 36, 32, 13)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 13\).*\(1, 32, 32, 3\)"):
        s2_model.encode(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"latents \(B, h, w, 16\)"):
        s2_model.decode(jnp.zeros((1, 4, 4, 8)))


def test_every_parameter_has_logical_axes(s2_model):
    rules = dict(LOGICAL_AXIS_RULES)
    for path, var in nnx.iter_graph(s2_model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var.get_value().ndim, path
            assert all(n in rules for n in names), (path, names)
            if var.get_value().ndim == 4:
                assert names == ("kernel_h", "kernel_w", "conv_in", "conv_out"), path
            if path[-1] == "scale":
                assert names == ("norm",), path
