"""Cloud removal with trained networks: batched latent sampling, and (see CloudRemover) whole scenes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from crrf_jax import flow as rf


@functools.partial(nnx.jit, static_argnames=("steps", "num_samples", "use_sar", "guidance_scale"))
def predict_batch(
    flow_model,
    vae_s2,
    vae_s1,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    steps: int = 8,
    guidance_scale: float = 1.0,
    num_samples: int = 1,
    use_sar: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Cloud-free estimates of a batch of patches.

    Args:
      batch: `s2_cloudy` (B, H, W, C) and `cloud_prob` (B, H, W, 1) in [0, 1], `s1` (B, H, W, 2) in [0, 1]
        (ignored when `use_sar` is False: the model's trained SAR-absent mode). H, W multiples of 16.
      steps: Euler steps on FLUX's shifted schedule; guidance_scale: classifier-free guidance (1 = off; the
        unconditional branch drops SAR and cloudy tokens); num_samples: K samples for mean and std.
    Returns:
      (mean, std): (B, H, W, C) float32 reflectance; the mean is clipped to [0, 1], the std is the per-pixel
      standard deviation over the K samples (0 for K = 1).
    """
    cloudy = vae_s2.encode(batch["s2_cloudy"] * 2.0 - 1.0).astype(jnp.float32)
    sar = vae_s1.encode(batch["s1"] * 2.0 - 1.0).astype(jnp.float32) if use_sar else None
    cloud_prob = batch["cloud_prob"]
    b, h, w, _ = cloudy.shape
    schedule = rf.timesteps(steps, (h // 2) * (w // 2))

    def velocity(x, t):
        return flow_model(x, t, cloudy, sar, cloud_prob).astype(jnp.float32)

    uncond = None
    if guidance_scale != 1.0:
        drop = jnp.ones((b,), bool)

        def uncond(x, t):
            return flow_model(x, t, cloudy, sar, cloud_prob, drop_sar=drop, drop_cloudy=drop).astype(jnp.float32)

    def decode(z):
        return (vae_s2.decode(z).astype(jnp.float32) + 1.0) * 0.5

    mean, std = rf.ensemble_sample(
        velocity, rng, cloudy.shape, schedule, num_samples, guidance_scale, uncond, decode_fn=decode
    )
    return jnp.clip(mean, 0.0, 1.0), std
