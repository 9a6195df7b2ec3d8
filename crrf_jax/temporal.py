"""Several cloudy dates of one scene: the T axis, the per-pixel least-cloudy date, random date dropout.

A single-date input is (B, H, W, C); a multi-temporal one is (B, T, H, W, C), dates in chronological order,
with one cloud-probability map per date, (B, T, H, W, 1). `present` (B, T) bool marks the dates a sample has:
a date dropped in training (`date_dropout`) is absent for the model (masked out of its attention) and for
the composite.

The least-cloudy composite (the classic best-pixel mosaic) takes every pixel from the present date where its
cloud probability is lowest, ties to the earliest date. It is the temporal learning-free reference
(`references.least_cloudy_composite`) and the flow's source image for multi-temporal inputs: as the single
cloudy image is for one date, it is what the flow starts from, so that what some date sees clear is already
in place (docs/ARCHITECTURE.md, "Rectified flow").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_multitemporal(images: jax.Array) -> bool:
    """Whether a batch of images carries a T axis: (B, T, H, W, C) rather than (B, H, W, C)."""
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (B, H, W, C) or (B, T, H, W, C), got shape {images.shape}")
    return images.ndim == 5


def least_cloudy_index(cloud_prob: jax.Array, present: jax.Array | None = None) -> jax.Array:
    """(B, T, H, W[, 1]) cloud probability (finite), present (B, T) or None -> (B, H, W) int32: the date of
    each pixel with the lowest cloud probability among the present dates (the first such date on ties)."""
    cp = cloud_prob[..., 0] if cloud_prob.ndim == 5 else cloud_prob
    cp = cp.astype(jnp.float32)
    if present is not None:
        cp = jnp.where(jnp.asarray(present, bool)[:, :, None, None], cp, jnp.inf)
    return jnp.argmin(cp, axis=1).astype(jnp.int32)


def take_dates(images: jax.Array, index: jax.Array) -> jax.Array:
    """(B, T, H, W, C) images, (B, H, W) date index -> (B, H, W, C): every pixel from its indexed date."""
    return jnp.take_along_axis(images, index[:, None, :, :, None], axis=1)[:, 0]


def composite(images: jax.Array, cloud_prob: jax.Array, present: jax.Array | None = None) -> jax.Array:
    """The least-cloudy composite of (B, T, H, W, C) images -> (B, H, W, C); see the module docstring."""
    return take_dates(images, least_cloudy_index(cloud_prob, present))


def date_dropout(rng: jax.Array, batch: int, dates: int, rate: float) -> jax.Array | None:
    """(B, T) bool: each date present with probability 1 - rate, and one date drawn uniformly always kept (a
    sample never loses all its dates). None when nothing can be dropped (rate 0 or a single date)."""
    if rate <= 0.0 or dates == 1:
        return None
    r_drop, r_keep = jax.random.split(rng)
    present = ~jax.random.bernoulli(r_drop, rate, (batch, dates))
    keep = jax.nn.one_hot(jax.random.randint(r_keep, (batch,), 0, dates), dates, dtype=bool)
    return present | keep


def flatten_dates(images: jax.Array) -> jax.Array:
    """(B, T, ...) -> (B * T, ...), date-minor (the inverse is `unflatten_dates`); (B, H, W, C) as is."""
    return images.reshape(-1, *images.shape[2:]) if images.ndim == 5 else images


def unflatten_dates(images: jax.Array, dates: int) -> jax.Array:
    """(B * T, ...) -> (B, T, ...)."""
    return images.reshape(-1, dates, *images.shape[1:])


def single_view(
    s2_cloudy: jax.Array, cloud_prob: jax.Array, s1: jax.Array | None = None, present: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The one-image view of the inputs, for what works at pixel level on one image (the refiner, the
    source of the flow): single-date inputs as they are; multi-temporal ones as their least-cloudy composite,
    with each pixel's cloud probability and SAR from the same date it was taken from."""
    if not is_multitemporal(s2_cloudy):
        return s2_cloudy, cloud_prob, s1
    index = least_cloudy_index(cloud_prob, present)
    return (take_dates(s2_cloudy, index), take_dates(cloud_prob, index),
            None if s1 is None else take_dates(s1, index))
