"""Rectified flow: time sampling, interpolation, losses, FLUX's shifted schedule, Euler sampler with CFG.

Convention (docs/ARCHITECTURE.md, "Rectified flow"; as BFL FLUX): t = 0 is data, t = 1 is the source,
`x_t = (1 - t) x0 + t x1`, velocity `v = dx_t/dt = x1 - x0`. Sampling integrates from t = 1 down to t = 0
with Euler steps `x <- x + (t_next - t_cur) v(x, t_cur)`.

The source x1 is one of two distributions (`source_sample`):

- "noise": x1 = eps ~ N(0, I), FLUX's text-to-image form;
- "cloudy": x1 = c + sigma * eps, the encoded cloudy image plus a little noise: the two-distribution form of
  rectified flow (Liu et al. 2022) and EMRDM's mean-reverting idea. Sampling starts from the cloudy image, so
  what is clear is already in place and few steps suffice (one step is exact for a straight flow).

Shapes: x0, eps, x_t, v are (B, ...) arrays (latents or tokens); t is (B,) (or a scalar) and broadcasts over
the trailing dimensions. Everything is a pure function and `jax.jit`-able; float32 in, float32 out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t (B, ...), t (B,)) -> v (B, ...)

T_EPS = 1e-6  # sampled t is clipped to [T_EPS, 1 - T_EPS] so it lies strictly inside (0, 1)


def sample_t(
    rng: jax.Array, batch: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0
) -> jax.Array:
    """Training times t, (batch,) float32 in (0, 1).

    kind: "logit_normal" (t = sigmoid(mean + std * n), n ~ N(0, 1); SD3/FLUX training) or "uniform" (U(0, 1)).
    Values are clipped to [1e-6, 1 - 1e-6].
    """
    if kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
    elif kind == "uniform":
        t = jax.random.uniform(rng, (batch,), jnp.float32)
    else:
        raise ValueError(f"sample_t: kind must be 'logit_normal' or 'uniform', got {kind!r}")
    return jnp.clip(t, T_EPS, 1.0 - T_EPS)


def _expand_t(t: jax.Array, like: jax.Array, name: str = "t") -> jax.Array:
    """t () or (B,) -> shape broadcastable against `like` (B, ...)."""
    t = jnp.asarray(t, like.dtype)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, like.shape[0])):
        raise ValueError(
            f"flow: {name} must be a scalar or (B,) with B = {like.shape[0]}, got shape {t.shape}"
        )
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


SOURCES = ("noise", "cloudy")


def source_sample(kind: str, eps: jax.Array, cloudy: jax.Array | None = None, sigma: float = 0.0) -> jax.Array:
    """The t = 1 end x1 (B, ...): `eps` for kind "noise", `cloudy + sigma * eps` for kind "cloudy".

    eps: standard-normal (B, ...); cloudy: the encoded cloudy image, same shape (required for "cloudy").
    """
    if kind == "noise":
        return eps
    if kind == "cloudy":
        if cloudy is None:
            raise ValueError("source_sample: kind 'cloudy' needs the cloudy latent")
        if cloudy.shape != eps.shape:
            raise ValueError(f"source_sample: cloudy shape {cloudy.shape} differs from eps shape {eps.shape}")
        return cloudy.astype(eps.dtype) + sigma * eps
    raise ValueError(f"source_sample: kind must be one of {SOURCES}, got {kind!r}")


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t x1; x0, x1 (B, ...), t () or (B,) in [0, 1] -> (B, ...)."""
    t = _expand_t(t, x0)
    return (1.0 - t) * x0 + t * x1


def velocity_target(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """The straight-line velocity dx_t/dt = x1 - x0, (B, ...)."""
    return x1 - x0


def x0_from_velocity(x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """Data estimate from a velocity: x0_hat = x_t - t v (exact for the true velocity), (B, ...)."""
    return x_t - _expand_t(t, x_t) * v


def flow_loss(v_pred: jax.Array, v_target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error between velocities, a float32 scalar.

    weights: optional per-sample (B,) or anything broadcastable to v_pred: loss = mean(weights * (v_pred -
    v_target)^2) over all elements (not renormalised by the weights' mean).
    """
    if v_pred.shape != v_target.shape:
        raise ValueError(
            f"flow_loss: v_pred shape {v_pred.shape} differs from v_target shape {v_target.shape}"
        )
    squared = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.ndim == 1:
            weights = _expand_t(weights, squared, "weights")
        squared = weights * squared
    return jnp.mean(squared)


def pixel_l1_loss(pred_pixels: jax.Array, target_pixels: jax.Array, cloud_prob: jax.Array) -> jax.Array:
    """Cloud-weighted L1 in pixel space: mean(|pred - target| * (1 + 2 cloud_prob)), a float32 scalar.

    pred_pixels, target_pixels: (B, H, W, C) (the decoded x0 estimate and the cloud-free image, same range);
    cloud_prob: (B, H, W, 1) raw s2cloudless probabilities on [0, 1] (broadcast over bands).
    """
    if pred_pixels.shape != target_pixels.shape:
        raise ValueError(
            f"pixel_l1_loss: pred shape {pred_pixels.shape} differs from target shape {target_pixels.shape}"
        )
    if cloud_prob.shape not in (pred_pixels.shape, (*pred_pixels.shape[:-1], 1)):
        raise ValueError(
            f"pixel_l1_loss: cloud_prob must be {(*pred_pixels.shape[:-1], 1)}, got shape {cloud_prob.shape}"
        )
    error = jnp.abs(pred_pixels.astype(jnp.float32) - target_pixels.astype(jnp.float32))
    return jnp.mean(error * (1.0 + 2.0 * cloud_prob.astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------- schedule


def time_shift(mu: float, sigma: float, t: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """FLUX's resolution shift of a time t in [0, 1]: e^mu / (e^mu + (1/t - 1)^sigma); keeps 0 -> 0, 1 -> 1.

    Works on NumPy and JAX arrays alike (returns the same kind); larger mu pushes times towards 1 (noise).
    """
    xp = jnp if isinstance(t, jax.Array) else np
    t = xp.asarray(t)
    positive = t > 0
    safe_t = xp.where(positive, t, 1.0)  # t = 0 maps to 0; keeps 1/0 out of the other branch
    shifted = xp.exp(mu) / (xp.exp(mu) + (1.0 / safe_t - 1.0) ** sigma)
    return xp.where(positive, shifted, xp.zeros_like(shifted))


def mu_for_seq_len(
    seq_len: int,
    base_seq: int = 256,
    max_seq: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Shift mu, linear in the image token count: base_shift at base_seq tokens, max_shift at max_seq."""
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return base_shift + slope * (seq_len - base_seq)


def timesteps(
    num_steps: int,
    seq_len: int,
    shift: bool = True,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> jax.Array:
    """Sampling times, (num_steps + 1,) float32 descending from 1 to 0 (BFL flux `get_schedule` semantics).

    Uniform times linspace(1, 0, num_steps + 1), then, when `shift`,
    `time_shift(mu_for_seq_len(seq_len), 1, t)`.
    seq_len is the number of generated image tokens (the noisy target tokens only, not the conditioning ones).
    """
    if num_steps < 1:
        raise ValueError(f"timesteps: num_steps must be >= 1, got {num_steps}")
    ts = np.linspace(1.0, 0.0, num_steps + 1)
    if shift:
        ts = time_shift(mu_for_seq_len(seq_len, base_shift=base_shift, max_shift=max_shift), 1.0, ts)
    return jnp.asarray(ts, jnp.float32)


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """What a trained flow model integrates: its source distribution and its sampling schedule.

    source: "noise" or "cloudy" (`source_sample`); sigma: the noise scale of the cloudy source; shift: FLUX's
    resolution-shifted schedule (`timesteps`) or uniform times. Hashable, so it can be a static jit argument.
    """

    source: str = "noise"
    sigma: float = 0.0
    shift: bool = True

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"flow source must be one of {SOURCES}, got {self.source!r}")
        if self.sigma < 0:
            raise ValueError(f"flow source sigma must be >= 0, got {self.sigma}")

    def start(self, eps: jax.Array, cloudy: jax.Array | None = None) -> jax.Array:
        """x1, the sampler's start (and the t = 1 end in training), from standard-normal `eps`."""
        return source_sample(self.source, eps, cloudy, self.sigma)

    def schedule(self, num_steps: int, seq_len: int) -> jax.Array:
        return timesteps(num_steps, seq_len, shift=self.shift)

    @classmethod
    def from_config(cls, cfg) -> FlowSpec:
        """From a mapping/ConfigDict with optional keys source, source_sigma, shift_schedule."""
        get = cfg.get
        return cls(str(get("source", "noise")), float(get("source_sigma", 0.0)), bool(get("shift_schedule", True)))


# ---------------------------------------------------------------------------------------------- sampling


def _guided_velocity(
    velocity_fn: VelocityFn, uncond_velocity_fn: VelocityFn | None, guidance_scale
) -> VelocityFn:
    """Classifier-free guidance v = v_u + s (v_c - v_u); just velocity_fn when no guidance is asked for."""
    scale_is_one = isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0
    if uncond_velocity_fn is None:
        if not scale_is_one:
            raise ValueError(
                f"euler_sample: guidance_scale={guidance_scale} needs an uncond_velocity_fn "
                "(classifier-free guidance)"
            )
        return velocity_fn
    if scale_is_one:
        return velocity_fn

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        v_cond = velocity_fn(x, t)
        v_uncond = uncond_velocity_fn(x, t)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return guided


def euler_sample(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    timesteps: jax.Array,
    guidance_scale: float | jax.Array = 1.0,
    uncond_velocity_fn: VelocityFn | None = None,
) -> jax.Array:
    """Integrates dx/dt = v from timesteps[0] (1, the source) to timesteps[-1] (0) with Euler steps.

    Args:
      velocity_fn: pure function (x_t (B, ...), t (B,) float32) -> v (B, ...), the conditional velocity.
      noise: x at timesteps[0], (B, ...) float32: a draw of the source (`source_sample`).
      timesteps: (N + 1,) descending times, e.g. `timesteps(N, seq_len)`.
      guidance_scale: CFG scale s; with s != 1, v = v_u + s (v_c - v_u) and `uncond_velocity_fn` is required.
        A traced (jit argument) scale always takes the CFG path.
      uncond_velocity_fn: the velocity with conditions dropped, same signature.
    Returns:
      x at timesteps[-1], (B, ...): the x0 estimate when the schedule ends at 0.
    """
    velocity = _guided_velocity(velocity_fn, uncond_velocity_fn, guidance_scale)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    if timesteps.ndim != 1 or timesteps.shape[0] < 2:
        raise ValueError(f"euler_sample: timesteps must be (N + 1,) with N >= 1, got shape {timesteps.shape}")
    batch = noise.shape[0]

    def step(i, x):
        t_cur, t_next = timesteps[i], timesteps[i + 1]
        v = velocity(x, jnp.full((batch,), t_cur, jnp.float32))
        return x + (t_next - t_cur).astype(x.dtype) * v.astype(x.dtype)

    return jax.lax.fori_loop(0, timesteps.shape[0] - 1, step, noise)


def ensemble_sample(
    velocity_fn: VelocityFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    timesteps: jax.Array,
    num_samples: int = 4,
    guidance_scale: float | jax.Array = 1.0,
    uncond_velocity_fn: VelocityFn | None = None,
    decode_fn: Callable[[jax.Array], jax.Array] | None = None,
    noise_fn: Callable[[jax.Array], jax.Array] | None = None,
    samples_per_pass: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """K Euler samples from independent noises -> per-element mean and standard deviation (uncertainty map).

    Args:
      shape: the noise shape (B, ...); each of the K samples draws fresh standard-normal noise of this shape
        from `rng`, unless `noise_fn` is given.
      noise_fn: optional (sample index k, int32 scalar) -> noise of `shape`, e.g. per-example keys so that an
        example's samples do not depend on the rest of the batch; `rng` is then unused.
      num_samples: K >= 1. The K samples run in ceil(K / P) passes of P = `samples_per_pass` samples (the last
        pass runs the K mod P left over, when P does not divide K); the passes run one after another
        (lax.scan, memory of one pass).
      samples_per_pass: P >= 1 (at most K is used). A pass evaluates its r <= P samples as extra batch rows:
        velocity_fn, uncond_velocity_fn and decode_fn then see r * B rows, patch-major (row i * r + j is
        example i's j-th sample of the pass), so a batch-sharded input stays sharded the same way and a
        closure over per-example conditioning repeats it with `jnp.repeat(c, x.shape[0] // B, axis=0)`.
        Sample k always starts from the same noise and the statistics are accumulated in the order k = 0 ..
        K - 1, so the result does not depend on P (up to the float reduction order of the bigger batch).
      decode_fn: optional map applied to each x0 sample before the statistics (e.g. VAE decode to [0, 1]
        pixels), so mean and std live in that space; identity when None.
    Returns:
      (mean, std) over the K samples, each of decode_fn's output shape for B rows; std is the population
      standard deviation (divide by K, as UnCRtainTS's ensemble variance), 0 for K = 1.
    """
    if num_samples < 1:
        raise ValueError(f"ensemble_sample: num_samples must be >= 1, got {num_samples}")
    if samples_per_pass < 1:
        raise ValueError(f"ensemble_sample: samples_per_pass must be >= 1, got {samples_per_pass}")
    per_pass = min(int(samples_per_pass), num_samples)
    decode = decode_fn if decode_fn is not None else (lambda x: x)
    batch = shape[0]

    def draw(key: jax.Array, index: jax.Array) -> jax.Array:
        return noise_fn(index) if noise_fn is not None else jax.random.normal(key, shape, jnp.float32)

    def one_pass(keys: jax.Array, indices: jax.Array) -> jax.Array:
        """The samples `indices` (r,) as r * B patch-major rows -> their decoded outputs (r, B, ...)."""
        r = indices.shape[0]
        noise = jnp.stack([draw(keys[j], indices[j]) for j in range(r)], axis=1)  # (B, r, ...)
        noise = noise.reshape((batch * r, *shape[1:]))
        x0 = euler_sample(velocity_fn, noise, timesteps, guidance_scale, uncond_velocity_fn)
        out = decode(x0).astype(jnp.float32)
        return jnp.moveaxis(out.reshape((batch, r, *out.shape[1:])), 1, 0)

    # Welford's running mean and sum of squared deviations, one sample at a time in index order: stable, and
    # the same arithmetic whatever the pass size.
    def accumulate(carry, keys_and_indices):
        mean, m2 = carry
        keys, indices = keys_and_indices
        samples = one_pass(keys, indices)
        for j in range(indices.shape[0]):
            delta = samples[j] - mean
            mean = mean + delta / (indices[j].astype(jnp.float32) + 1.0)
            m2 = m2 + delta * (samples[j] - mean)
        return (mean, m2), None

    keys = jax.random.split(rng, num_samples)
    indices = jnp.arange(num_samples, dtype=jnp.int32)
    out_shape = jax.eval_shape(one_pass, keys[:1], indices[:1]).shape[1:]
    carry = (jnp.zeros(out_shape, jnp.float32), jnp.zeros(out_shape, jnp.float32))
    full, done = num_samples // per_pass, (num_samples // per_pass) * per_pass
    passes = (keys[:done].reshape((full, per_pass, *keys.shape[1:])), indices[:done].reshape(full, per_pass))
    carry, _ = jax.lax.scan(accumulate, carry, passes)
    if done < num_samples:  # the K mod P samples left over: one smaller pass
        carry, _ = accumulate(carry, (keys[done:], indices[done:]))
    mean, m2 = carry
    return mean, jnp.sqrt(jnp.maximum(m2 / num_samples, 0.0))
