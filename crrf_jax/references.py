"""Learning-free cloud-removal references: what a trained model has to beat on held-out scenes.

Each reference keeps the clear pixels of the cloudy image exactly and fills the cloudy ones (cloud probability
above a threshold, the same rule as `crrf_jax.metrics.cloudy_mask`) from the clear ones only; none of them
looks at SAR, at the cloud-free target or at any training data:

- `mean_fill`: every cloudy pixel gets the image's per-band mean over its clear pixels;
- `biharmonic_fill`: the cloudy regions are inpainted by a biharmonic surface that continues the clear pixels
  around them smoothly (scikit-image `inpaint_biharmonic`, every band on its own).

All functions work on host NumPy arrays, channels last, reflectance on [0, 1]. An image without a single clear
pixel has nothing to fill from: both references then return the cloudy image unchanged, which scores exactly
like the cloudy input. `crrf_jax.evaluation.evaluate` scores them beside the model, and `bench/quality.py`
reports them on held-out scenes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from crrf_jax import temporal

Reference = Callable[[np.ndarray, np.ndarray], np.ndarray]


def cloud_mask(cloud_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Cloudy pixels, cloud_prob > threshold: (H, W, 1) or (H, W) on [0, 1] -> bool (H, W).

    The host-side twin of `crrf_jax.metrics.cloudy_mask` (strictly greater than the threshold).
    """
    cloud_prob = np.asarray(cloud_prob)
    if cloud_prob.ndim == 3 and cloud_prob.shape[-1] == 1:
        cloud_prob = cloud_prob[..., 0]
    if cloud_prob.ndim != 2:
        raise ValueError(f"cloud_mask: cloud_prob must be (H, W) or (H, W, 1), got shape {cloud_prob.shape}")
    return cloud_prob > threshold


def _check(cloudy: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cloudy = np.asarray(cloudy)
    mask = np.asarray(mask, bool)
    if cloudy.ndim != 3:
        raise ValueError(f"cloudy image must be (H, W, C), got shape {cloudy.shape}")
    if mask.shape != cloudy.shape[:2]:
        raise ValueError(f"mask must be (H, W) = {cloudy.shape[:2]}, got shape {mask.shape}")
    if not np.issubdtype(cloudy.dtype, np.floating):
        raise ValueError(f"cloudy image must be float reflectance on [0, 1], got dtype {cloudy.dtype}")
    return cloudy, mask


def _fill(cloudy: np.ndarray, mask: np.ndarray, values) -> np.ndarray:
    """`cloudy` with its masked pixels set to `values(cloudy, mask)` (the fill of those pixels, or one value
    per band); unchanged when the image has no masked or no clear pixel."""
    cloudy, mask = _check(cloudy, mask)
    out = cloudy.copy()
    if mask.any() and (~mask).any():
        out[mask] = np.asarray(values(cloudy, mask)).astype(cloudy.dtype)
    return out


def mean_fill(cloudy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Cloudy pixels replaced by the per-band mean of the image's clear pixels.

    Args:
      cloudy: (H, W, C) float reflectance on [0, 1].
      mask: bool (H, W), True where cloudy (to be filled).
    Returns:
      (H, W, C), the dtype of `cloudy`: clear pixels bit-identical to `cloudy`; the cloudy image unchanged
      when no pixel is clear.
    """
    return _fill(cloudy, mask, lambda image, m: image[~m].mean(axis=0, dtype=np.float64))


def biharmonic_fill(cloudy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Cloudy pixels inpainted by a biharmonic surface through the clear ones, band by band, clipped to [0, 1].

    Args:
      cloudy: (H, W, C) float reflectance on [0, 1].
      mask: bool (H, W), True where cloudy (to be filled).
    Returns:
      (H, W, C), the dtype of `cloudy`: clear pixels bit-identical to `cloudy`; the cloudy image unchanged
      when no pixel is clear.
    """
    from skimage.restoration import inpaint_biharmonic

    return _fill(cloudy, mask, lambda image, m: np.clip(inpaint_biharmonic(image, m, channel_axis=-1)[m], 0, 1))


# Single-image references only: `crrf_jax.evaluation` calls every entry, through `fill_batch`, on batches of
# one cloudy image per sample. The temporal `least_cloudy_composite` below takes a stack of dates and is
# deliberately not registered here.
REFERENCES: dict[str, Reference] = {"mean_fill": mean_fill, "biharmonic": biharmonic_fill}


def fill_batch(
    name: str, cloudy: np.ndarray, cloud_prob: np.ndarray, threshold: float = 0.5, *,
    pool: Executor | None = None,
) -> np.ndarray:
    """Reference `name` of `REFERENCES` on every image of a batch.

    Args:
      name: a key of REFERENCES.
      cloudy: (B, H, W, C) float reflectance on [0, 1].
      cloud_prob: (B, H, W, 1) or (B, H, W) on [0, 1]; pixels above `threshold` are filled.
      pool: fills the images side by side when given (a thread pool: scikit-image's inpainting spends most of
        its time in SciPy's sparse solver, which lets go of the GIL); each image is filled alike either way.
    Returns:
      (B, H, W, C) float32.
    """
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; choose one of {sorted(REFERENCES)}")
    cloudy = np.asarray(cloudy, np.float32)
    cloud_prob = np.asarray(cloud_prob)
    if cloudy.ndim != 4 or cloud_prob.shape[:3] != cloudy.shape[:3]:
        raise ValueError(f"fill_batch: cloudy must be (B, H, W, C) and cloud_prob (B, H, W[, 1]) of the same "
                         f"images, got {cloudy.shape} and {cloud_prob.shape}")
    fill = REFERENCES[name]
    if not len(cloudy):
        return cloudy.copy()
    def one(image: np.ndarray, prob: np.ndarray) -> np.ndarray:
        return fill(image, cloud_mask(prob, threshold))

    return np.stack(list((pool.map if pool is not None else map)(one, cloudy, cloud_prob)))


def least_cloudy_composite(s2_cloudy: np.ndarray, cloud_prob: np.ndarray) -> np.ndarray:
    """The best-pixel mosaic of a multi-temporal stack: every pixel from the date where it is least cloudy.

    Args:
      s2_cloudy: (T, H, W, C) float reflectance on [0, 1], the dates of one scene.
      cloud_prob: (T, H, W) or (T, H, W, 1) cloud probability of each date, finite.
    Returns:
      (H, W, C), the dtype of `s2_cloudy`: pixel (i, j) is ``s2_cloudy[t, i, j]`` for the t with the lowest
      ``cloud_prob[t, i, j]``; ties go to the earliest date. A temporal reference: it is not in `REFERENCES`.
    """
    s2_cloudy = np.asarray(s2_cloudy)
    cloud_prob = np.asarray(cloud_prob)
    if cloud_prob.ndim == 4 and cloud_prob.shape[-1] == 1:
        cloud_prob = cloud_prob[..., 0]
    if s2_cloudy.ndim != 4 or not len(s2_cloudy):
        raise ValueError(f"least_cloudy_composite: s2_cloudy must be (T, H, W, C) with T >= 1, "
                         f"got shape {s2_cloudy.shape}")
    if cloud_prob.shape != s2_cloudy.shape[:3]:
        raise ValueError(f"least_cloudy_composite: cloud_prob must be (T, H, W[, 1]) = {s2_cloudy.shape[:3]}, "
                         f"got shape {np.shape(cloud_prob)}")
    if not np.all(np.isfinite(cloud_prob)):
        raise ValueError("least_cloudy_composite: cloud_prob contains NaN or Inf")
    best = np.asarray(temporal.least_cloudy_index(cloud_prob[None]))[0]  # the flow's composite rule too
    return np.take_along_axis(s2_cloudy, best[None, ..., None], axis=0)[0]
