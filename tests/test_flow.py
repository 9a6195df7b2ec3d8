"""Rectified flow: interpolation, targets, losses, FLUX schedule (vs diffusers, NumPy), Euler sampler, CFG."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crrf_jax import flow

SHAPE = (3, 4, 4, 2)  # (B, H, W, C) latents


def _x0_eps(seed: int = 0):
    k0, k1 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k0, SHAPE), jax.random.normal(k1, SHAPE)


# ------------------------------------------------------------------------------------------ training pieces


def test_interpolation_endpoints_and_per_sample_broadcast():
    x0, eps = _x0_eps()
    np.testing.assert_array_equal(flow.interpolate(x0, eps, jnp.zeros(3)), x0)
    np.testing.assert_array_equal(flow.interpolate(x0, eps, jnp.ones(3)), eps)
    t = jnp.array([0.0, 0.25, 1.0])
    x_t = flow.interpolate(x0, eps, t)
    np.testing.assert_allclose(x_t[1], 0.75 * x0[1] + 0.25 * eps[1], rtol=1e-6)
    np.testing.assert_array_equal(x_t[0], x0[0])
    np.testing.assert_array_equal(x_t[2], eps[2])
    np.testing.assert_allclose(flow.interpolate(x0, eps, 0.5), 0.5 * (x0 + eps), rtol=1e-6)  # scalar t
    with pytest.raises(ValueError, match="t must be a scalar or"):
        flow.interpolate(x0, eps, jnp.ones(2))


def test_velocity_target_is_consistent_with_interpolation():
    x0, eps = _x0_eps(1)
    t = jnp.array([0.1, 0.5, 0.9])
    x_t = flow.interpolate(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    np.testing.assert_array_equal(v, eps - x0)
    np.testing.assert_allclose(flow.x0_from_velocity(x_t, t, v), x0, atol=1e-5)  # x_t + (0 - t) v
    np.testing.assert_allclose(x_t + (1.0 - t)[:, None, None, None] * v, eps, atol=1e-5)
    # the velocity is the time derivative of the interpolation
    dt = 1e-2
    finite_difference = (flow.interpolate(x0, eps, t + dt) - flow.interpolate(x0, eps, t - dt)) / (2 * dt)
    np.testing.assert_allclose(finite_difference, v, atol=1e-3)


def test_sample_t_logit_normal_and_uniform():
    t = flow.sample_t(jax.random.PRNGKey(0), 20000)
    assert t.shape == (20000,) and t.dtype == jnp.float32
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    assert abs(float(jnp.median(t)) - 0.5) < 0.02
    logits = np.log(np.asarray(t, np.float64) / (1 - np.asarray(t, np.float64)))
    assert abs(logits.mean()) < 0.05 and abs(logits.std() - 1.0) < 0.05
    shifted = flow.sample_t(jax.random.PRNGKey(1), 20000, mean=1.0, std=0.5)
    assert abs(float(jnp.median(shifted)) - float(jax.nn.sigmoid(1.0))) < 0.02
    u = flow.sample_t(jax.random.PRNGKey(2), 20000, kind="uniform")
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(jnp.mean(u < 0.25)) - 0.25) < 0.01
    assert not np.array_equal(np.asarray(flow.sample_t(jax.random.PRNGKey(3), 8)), np.asarray(t[:8]))
    with pytest.raises(ValueError, match="kind must be"):
        flow.sample_t(jax.random.PRNGKey(0), 4, kind="cosine")


def test_flow_loss_hand_computed():
    v_pred = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    v_target = jnp.zeros((2, 2))
    assert float(flow.flow_loss(v_pred, v_target)) == pytest.approx(7.5)  # (1 + 4 + 9 + 16) / 4
    assert float(flow.flow_loss(v_pred, v_target, jnp.array([1.0, 0.0]))) == pytest.approx(1.25)
    assert float(flow.flow_loss(v_pred, v_pred)) == 0.0
    with pytest.raises(ValueError, match="differs from v_target"):
        flow.flow_loss(v_pred, v_target[:1])


def test_pixel_l1_loss_weights_cloudy_pixels():
    pred = jnp.array([[[[0.5, 0.5], [1.0, 1.0]]]])  # (1, 1, 2, 2)
    target = jnp.zeros_like(pred)
    cloud = jnp.array([[[[0.0], [1.0]]]])  # clear pixel weight 1, cloudy pixel weight 3
    assert float(flow.pixel_l1_loss(pred, target, cloud)) == pytest.approx((0.5 + 0.5 + 3.0 + 3.0) / 4)
    half = jnp.full_like(cloud, 0.5)  # weight 2 everywhere
    assert float(flow.pixel_l1_loss(pred, target, half)) == pytest.approx(2 * 0.75)
    with pytest.raises(ValueError, match="cloud_prob must be"):
        flow.pixel_l1_loss(pred, target, cloud[..., 0])


# ------------------------------------------------------------------------------------------ schedule


def _numpy_schedule(num_steps: int, seq_len: int) -> np.ndarray:
    """BFL get_schedule transcribed: mu linear through (256, 0.5) and (4096, 1.15), shift with sigma = 1."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    t = np.linspace(1.0, 0.0, num_steps + 1)
    with np.errstate(divide="ignore"):
        return np.exp(mu) / (np.exp(mu) + (1.0 / t - 1.0))


def test_mu_for_seq_len():
    assert flow.mu_for_seq_len(256) == pytest.approx(0.5, abs=1e-12)
    assert flow.mu_for_seq_len(4096) == pytest.approx(1.15, abs=1e-12)
    assert flow.mu_for_seq_len(2176) == pytest.approx(0.825, abs=1e-12)  # halfway


@pytest.mark.parametrize("num_steps,seq_len", [(1, 256), (8, 256), (28, 1024), (50, 4096)])
def test_timesteps_match_numpy_transcription(num_steps, seq_len):
    ts = np.asarray(flow.timesteps(num_steps, seq_len))
    assert ts.shape == (num_steps + 1,) and ts.dtype == np.float32
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert np.all(np.diff(ts) < 0)
    np.testing.assert_allclose(ts, _numpy_schedule(num_steps, seq_len), atol=1e-6)
    unshifted = np.asarray(flow.timesteps(num_steps, seq_len, shift=False))
    np.testing.assert_allclose(unshifted, np.linspace(1, 0, num_steps + 1), atol=1e-7)
    assert np.all(ts[1:-1] > unshifted[1:-1])  # mu > 0 moves times towards noise


def test_timesteps_match_diffusers_flux_scheduler():
    diffusers = pytest.importorskip("diffusers")
    num_steps, seq_len = 12, 1024
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential",
    )
    # FluxPipeline: sigmas = linspace(1, 1/N, N), mu from the sequence length; the scheduler appends 0.
    scheduler.set_timesteps(
        num_steps, sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=flow.mu_for_seq_len(seq_len)
    )
    ours = np.asarray(flow.timesteps(num_steps, seq_len))
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), atol=1e-6)


def test_time_shift_numpy_and_jax():
    t = np.array([0.0, 0.3, 1.0])
    np.testing.assert_allclose(flow.time_shift(0.0, 1.0, t), t, atol=1e-12)  # mu = 0, sigma = 1: identity
    shifted_np = flow.time_shift(0.7, 1.3, t)
    shifted_jax = flow.time_shift(0.7, 1.3, jnp.asarray(t, jnp.float32))
    assert isinstance(shifted_jax, jax.Array) and isinstance(shifted_np, np.ndarray)
    np.testing.assert_allclose(np.asarray(shifted_jax), shifted_np, rtol=1e-6)
    assert shifted_np[0] == 0.0 and shifted_np[-1] == 1.0
    expected = np.exp(0.7) / (np.exp(0.7) + (1 / 0.3 - 1) ** 1.3)
    assert shifted_np[1] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------ sampling


def test_euler_recovers_x0_for_straight_line_flow():
    x0, noise = _x0_eps(2)

    def velocity(x, t):  # the exact velocity field of straight paths that all end at x0
        return (x - x0) / t[:, None, None, None]

    for ts in (flow.timesteps(4, 256), flow.timesteps(1, 256, shift=False)):
        np.testing.assert_allclose(flow.euler_sample(velocity, noise, ts), x0, atol=1e-5)
    constant_v = noise - x0  # constant field: one straight line from noise to x0
    out = flow.euler_sample(lambda x, t: jnp.broadcast_to(constant_v, x.shape), noise, flow.timesteps(7, 512))
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_euler_step_rule_matches_manual_loop():
    _, noise = _x0_eps(3)
    ts = np.asarray(flow.timesteps(6, 700))
    # dx/dt = t * x: each step multiplies by (1 + (t_next - t_cur) * t_cur), t_cur being the step's start time
    seen_t = []

    def velocity(x, t):
        seen_t.append(t.shape)
        return t[:, None, None, None] * x

    factor = np.prod([1.0 + (ts[i + 1] - ts[i]) * ts[i] for i in range(len(ts) - 1)])
    np.testing.assert_allclose(flow.euler_sample(velocity, noise, ts), noise * factor, rtol=1e-5)
    assert seen_t == [(SHAPE[0],)]  # traced once inside fori_loop, with a (B,) time vector


def test_classifier_free_guidance():
    x0, noise = _x0_eps(4)
    ts = flow.timesteps(5, 256)

    def cond(x, t):
        return 0.5 * x + x0

    def uncond(x, t):
        return -0.2 * x

    # scale 1: the conditional sampler (uncond not even needed)
    np.testing.assert_array_equal(
        flow.euler_sample(cond, noise, ts, 1.0, uncond), flow.euler_sample(cond, noise, ts)
    )
    scale = 3.5
    x = np.asarray(noise, np.float64)
    ts_np = np.asarray(ts, np.float64)
    for i in range(len(ts_np) - 1):
        v_c, v_u = 0.5 * x + np.asarray(x0), -0.2 * x
        x = x + (ts_np[i + 1] - ts_np[i]) * (v_u + scale * (v_c - v_u))
    np.testing.assert_allclose(flow.euler_sample(cond, noise, ts, scale, uncond), x, rtol=1e-4, atol=1e-5)
    # a traced scale works under jit
    jitted = jax.jit(lambda n, s: flow.euler_sample(cond, n, ts, s, uncond))
    np.testing.assert_allclose(jitted(noise, jnp.float32(scale)), x, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs an uncond_velocity_fn"):
        flow.euler_sample(cond, noise, ts, guidance_scale=2.0)


def test_euler_sample_jits_and_checks_timesteps():
    x0, noise = _x0_eps(5)

    def velocity(x, t):
        return (x - x0) / t[:, None, None, None]

    sample = jax.jit(functools.partial(flow.euler_sample, velocity))
    np.testing.assert_allclose(sample(noise, flow.timesteps(10, 256)), x0, atol=1e-5)
    with pytest.raises(ValueError, match="timesteps must be"):
        flow.euler_sample(velocity, noise, jnp.array([1.0]))


def test_ensemble_mean_and_std():
    x0, _ = _x0_eps(6)
    ts = flow.timesteps(4, 256)

    def to_x0(x, t):  # every noise flows to the same x0: no uncertainty
        return (x - x0) / t[:, None, None, None]

    mean, std = flow.ensemble_sample(to_x0, jax.random.PRNGKey(0), SHAPE, ts, num_samples=5)
    np.testing.assert_allclose(mean, x0, atol=1e-5)
    np.testing.assert_allclose(std, 0.0, atol=1e-5)

    def spread(x, t):  # a constant field: the output noise - x0 depends on the noise
        return jnp.broadcast_to(x0, x.shape)

    run = jax.jit(
        lambda rng: flow.ensemble_sample(spread, rng, SHAPE, ts, num_samples=6, decode_fn=lambda z: 2.0 * z)
    )
    mean, std = run(jax.random.PRNGKey(1))
    assert mean.shape == SHAPE and std.shape == SHAPE
    assert float(std.min()) > 0.0
    # equals the K samples drawn one by one with the same keys
    one_sample = jax.jit(lambda noise: 2.0 * flow.euler_sample(spread, noise, ts))
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    samples = np.stack([one_sample(jax.random.normal(k, SHAPE)) for k in keys])
    np.testing.assert_allclose(mean, samples.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, samples.std(0), atol=1e-5)  # population std (divide by K)
    _, single_std = flow.ensemble_sample(spread, jax.random.PRNGKey(2), SHAPE, ts, num_samples=1)
    np.testing.assert_array_equal(single_std, 0.0)
    with pytest.raises(ValueError, match="num_samples"):
        flow.ensemble_sample(spread, jax.random.PRNGKey(2), SHAPE, ts, num_samples=0)


# ------------------------------------------------------------------------------------------ cloudy source


def test_cloudy_source_interpolation_ends():
    """t = 0 is the clear latent, t = 1 the cloudy latent plus sigma * eps; the target is their difference."""
    x0, eps = _x0_eps(5)
    cloudy = jax.random.normal(jax.random.PRNGKey(9), SHAPE)
    spec = flow.FlowSpec("cloudy", sigma=0.3)
    x1 = spec.start(eps, cloudy)
    np.testing.assert_allclose(x1, cloudy + 0.3 * eps, rtol=1e-6)
    np.testing.assert_array_equal(flow.interpolate(x0, x1, jnp.zeros(3)), x0)
    np.testing.assert_array_equal(flow.interpolate(x0, x1, jnp.ones(3)), x1)
    np.testing.assert_allclose(flow.velocity_target(x0, x1), x1 - x0, rtol=1e-6)
    np.testing.assert_array_equal(flow.FlowSpec("noise").start(eps, cloudy), eps)  # noise ignores cloudy
    with pytest.raises(ValueError, match="needs the cloudy latent"):
        flow.FlowSpec("cloudy").start(eps)
    with pytest.raises(ValueError, match="flow source must be one of"):
        flow.FlowSpec("haze")
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        flow.FlowSpec("cloudy", -1.0)


@pytest.mark.parametrize("shift", [True, False])
def test_cloudy_source_one_step_limit(shift):
    """For the straight flow from x1 = cloudy + sigma eps to x0, the exact velocity (x_t - x0) / t takes one
    Euler step from t = 1 to 0 onto x0; so does any number of steps, on either schedule."""
    x0, eps = _x0_eps(6)
    cloudy = jax.random.normal(jax.random.PRNGKey(10), SHAPE)
    spec = flow.FlowSpec("cloudy", sigma=0.2, shift=shift)
    x1 = spec.start(eps, cloudy)

    def exact_velocity(x, t):
        return (x - x0) / t.reshape(-1, 1, 1, 1)

    for steps in (1, 3):
        out = flow.euler_sample(exact_velocity, x1, spec.schedule(steps, 16))
        np.testing.assert_allclose(out, x0, atol=1e-5)
    schedule = spec.schedule(4, 16)
    assert float(schedule[0]) == 1.0 and float(schedule[-1]) == 0.0
    if not shift:
        np.testing.assert_allclose(schedule, np.linspace(1, 0, 5), atol=1e-7)


def test_flow_spec_from_config_defaults_to_the_noise_source():
    """Bundles written before the cloudy source existed carry no source: they sample from noise."""
    assert flow.FlowSpec.from_config({}) == flow.FlowSpec("noise", 0.0, True)
    cfg = {"source": "cloudy", "source_sigma": 0.1, "shift_schedule": False}
    assert flow.FlowSpec.from_config(cfg) == flow.FlowSpec("cloudy", 0.1, False)


def test_joint_condition_dropout_rate():
    """Both conditions are dropped together with probability joint + (1 - joint) * p_sar * p_cloudy, and each
    on its own at its marginal rate joint + (1 - joint) * p."""
    from crrf_jax import train_lib

    cfg = train_lib.FlowLossConfig(sar_dropout=0.1, cloudy_dropout=0.2, joint_dropout=0.15)
    n = 200_000
    drop_sar, drop_cloudy = (np.asarray(d) for d in train_lib.condition_dropout(jax.random.key(0), n, cfg))
    expected = {
        "both": 0.15 + 0.85 * 0.1 * 0.2,
        "sar": 0.15 + 0.85 * 0.1,
        "cloudy": 0.15 + 0.85 * 0.2,
    }
    observed = {"both": np.mean(drop_sar & drop_cloudy), "sar": drop_sar.mean(), "cloudy": drop_cloudy.mean()}
    for name, p in expected.items():
        assert abs(observed[name] - p) < 4 * np.sqrt(p * (1 - p) / n), (name, observed[name], p)
    none = train_lib.FlowLossConfig(sar_dropout=0.0, cloudy_dropout=0.0, joint_dropout=0.0)
    assert not np.any(np.asarray(train_lib.condition_dropout(jax.random.key(1), 1000, none)))
