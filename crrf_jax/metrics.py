"""Image metrics computed the way UnCRtainTS and EMRDM compute them: PSNR, SSIM, SAM, MAE, RMSE.

All functions take channels-last float images on [0, 1]: one image `(H, W, C)` or a batch `(B, H, W, C)`,
C = any number of bands. Every metric is computed per image over all pixels and all bands, and a test set's
figure is the mean over images (`RunningMean`). Everything is float32 and `jax.jit`-able.

Definitions (checked against UnCRtainTS `model/src/learning/metrics.py::img_metrics` + `util/pytorch_ssim` and
EMRDM `sgm/modules/learning/metrics.py`, which are the same code):

- RMSE = sqrt(mean over pixels and bands of (pred - target)^2); MAE = mean |pred - target|.
- PSNR = 20 log10(1 / RMSE) (peak 1). Identical images give +inf, as theirs do (their mean over images then
  becomes inf too; `RunningMean` keeps that behaviour).
- SAM = mean over pixels of arccos(clip(<p, t> / (|p| |t|), -1, 1)), in degrees, p and t the C-band vectors
  of a pixel. A pixel whose pred or target vector is all zeros gives 0/0 = NaN, so the image's SAM is NaN,
  exactly as in theirs; `RunningMean` then leaves that image out of the SAM mean (as their `avg_img_metrics`
  does) and counts it. We compute the cosine as <p, t> / sqrt(|p|^2 |t|^2) (they divide by |t| then by |p|):
  equal up to float rounding, and it makes identical vectors give exactly 0 degrees.
- SSIM: 11x11 Gaussian window (sigma 1.5, normalised), zero padding as torch `conv2d(padding=5)`, local
  statistics with population (biased) moments, C1 = 0.01^2, C2 = 0.03^2 (data range 1); the SSIM map is
  computed per band and averaged over bands and pixels, the border pixels included (their pytorch_ssim). This
  differs from scikit-image, which reflects at the border and crops 5 pixels before averaging; in the interior
  the two maps agree.

Differences from theirs, on purpose:

- Predictions are clipped to [0, 1] before any metric (`clip=True`, the default; the target is not touched).
  UnCRtainTS and EMRDM score unclipped network outputs (EMRDM maps [-1, 1] to [0, 1] without clipping for
  SEN12MS-CR); pass `clip=False` to reproduce that. Clipping can only lower the error against a [0, 1]
  target, but it may turn a pixel whose bands are all negative into a zero vector and so make SAM NaN.
- Masked metrics ("cloudy pixels only", `mask` = a boolean (H, W) map, e.g. cloud probability > 0.5): RMSE,
  MAE and PSNR over the masked pixels and all bands (EMRDM's RMSE_cloudy / MAE_cloudy definition; EMRDM has
  no masked PSNR, SAM or SSIM, these are ours), SAM as the mean angle over the masked pixels, SSIM as the
  mean of the full-image SSIM map over the masked pixels (the windows still see unmasked neighbours). An
  empty mask gives NaN for every metric (EMRDM's np.nanmean of an empty selection also gives NaN);
  `RunningMean` skips such images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
METRIC_NAMES = ("psnr", "ssim", "sam", "mae", "rmse")


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian weights, shape (size,), float32; the 2-D SSIM window is its outer product."""
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _gaussian_blur(x: jax.Array) -> jax.Array:
    """Zero-padded 11x11 Gaussian filter of each channel of x (H, W, K) -> (H, W, K), as two 1-D passes.

    Each pass sums the window's 11 taps over shifted views of the zero-padded image, in tap order: elementwise
    work that XLA fuses. On CPUs it is 14-19x faster than XLA's grouped (depthwise) convolution of the same
    window, and as close to a float64 filter (BENCHMARKS.md "Evaluation: host work").
    """
    g = gaussian_window_1d()
    pad = SSIM_WINDOW // 2
    for axis in (0, 1):
        size = x.shape[axis]
        padded = jnp.pad(x, [(pad, pad) if a == axis else (0, 0) for a in range(x.ndim)])
        x = sum(float(g[k]) * lax.slice_in_dim(padded, k, k + size, axis=axis) for k in range(SSIM_WINDOW))
    return x


def blur_matrix(size: int, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(size, size) float32 matrix B with B @ v = the zero-padded Gaussian filtering of a length-`size` signal.

    Row i holds the 1-D window centred on i, cut where it leaves the signal (zero padding).
    """
    g = gaussian_window_1d(window, sigma)
    offsets = np.arange(size)[None, :] - np.arange(size)[:, None] + window // 2  # column j of row i -> tap
    inside = (offsets >= 0) & (offsets < window)
    return np.where(inside, g[np.clip(offsets, 0, window - 1)], 0.0).astype(np.float32)


def gaussian_blur_matmul(x: jax.Array) -> jax.Array:
    """`_gaussian_blur` as two matmuls with banded matrices (`blur_matrix`), (H, W, K) -> (H, W, K).

    The same filter up to float32 summation order; on CPUs far faster than a grouped convolution, and so is
    its gradient, which is why the refiner's SSIM loss uses it. Metrics use `_gaussian_blur`.
    """
    rows = jnp.asarray(blur_matrix(x.shape[0]))
    cols = jnp.asarray(blur_matrix(x.shape[1]))
    x = jnp.einsum("ij,jwk->iwk", rows, x, precision=lax.Precision.HIGHEST)
    return jnp.einsum("vw,iwk->ivk", cols, x, precision=lax.Precision.HIGHEST)


def ssim_map(pred: jax.Array, target: jax.Array, blur=None) -> jax.Array:
    """Per-pixel, per-band SSIM of two (H, W, C) images on [0, 1] -> (H, W, C) float32 (no clipping here).

    blur: the Gaussian filter (default `_gaussian_blur`; `gaussian_blur_matmul` for training).
    """
    blur = _gaussian_blur if blur is None else blur
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    channels = pred.shape[-1]
    stats = blur(jnp.concatenate([pred, target, pred * pred, target * target, pred * target], -1))
    mu_p, mu_t, e_pp, e_tt, e_pt = (stats[..., i * channels : (i + 1) * channels] for i in range(5))
    var_p = e_pp - mu_p * mu_p
    var_t = e_tt - mu_t * mu_t
    cov = e_pt - mu_p * mu_t
    numerator = (2 * mu_p * mu_t + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_p * mu_p + mu_t * mu_t + SSIM_C1) * (var_p + var_t + SSIM_C2)
    return numerator / denominator


def spectral_angle_map(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-pixel spectral angle in degrees between (H, W, C) images -> (H, W); NaN where a vector is zero."""
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    dot = jnp.sum(pred * target, axis=-1)
    norms = jnp.sqrt(jnp.sum(pred * pred, axis=-1) * jnp.sum(target * target, axis=-1))
    cosine = jnp.clip(dot / norms, -1.0, 1.0)
    return jnp.degrees(jnp.arccos(cosine))


def _check_image_pair(pred, target, mask, batched: bool) -> None:
    ndim = 4 if batched else 3
    layout = "(B, H, W, C)" if batched else "(H, W, C)"
    if pred.ndim != ndim:
        raise ValueError(f"metrics: pred must be {layout}, got shape {pred.shape}")
    if pred.shape != target.shape:
        raise ValueError(f"metrics: pred shape {pred.shape} differs from target shape {target.shape}")
    if mask is not None and mask.shape not in (pred.shape[:-1], (*pred.shape[:-1], 1)):
        raise ValueError(
            f"metrics: mask must have shape {pred.shape[:-1]} (one value per pixel), got {mask.shape}"
        )


def _image_metrics(pred: jax.Array, target: jax.Array, mask: jax.Array | None, clip: bool) -> dict:
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if clip:
        pred = jnp.clip(pred, 0.0, 1.0)
    height, width, channels = pred.shape
    if mask is None:
        keep = jnp.ones((height, width), bool)
    else:
        keep = jnp.asarray(mask).reshape(height, width).astype(bool)
    num_pixels = jnp.sum(keep, dtype=jnp.float32)

    def pixel_mean(values: jax.Array) -> jax.Array:  # (H, W) -> mean over kept pixels; 0 / 0 = NaN if none
        return jnp.sum(jnp.where(keep, values, 0.0)) / num_pixels

    diff = pred - target
    rmse = jnp.sqrt(pixel_mean(jnp.mean(diff * diff, axis=-1)))
    return {
        "psnr": 20.0 * jnp.log10(1.0 / rmse),
        "ssim": pixel_mean(jnp.mean(ssim_map(pred, target), axis=-1)),
        "sam": pixel_mean(spectral_angle_map(pred, target)),
        "mae": pixel_mean(jnp.mean(jnp.abs(diff), axis=-1)),
        "rmse": rmse,
    }


def image_metrics(
    pred: jax.Array, target: jax.Array, mask: jax.Array | None = None, *, clip: bool = True
) -> dict[str, jax.Array]:
    """Metrics of one image pair.

    Args:
      pred, target: (H, W, C) float on [0, 1]; pred is clipped to [0, 1] first when `clip`.
      mask: optional bool (H, W) (or (H, W, 1)): evaluate only these pixels (e.g. cloudy ones); all pixels
        when None; an empty mask gives NaN.
    Returns:
      {"psnr" (dB), "ssim", "sam" (degrees), "mae", "rmse"}: float32 scalars.
    """
    _check_image_pair(pred, target, mask, batched=False)
    return _image_metrics(pred, target, mask, clip)


def batch_metrics(
    pred: jax.Array, target: jax.Array, mask: jax.Array | None = None, *, clip: bool = True
) -> dict[str, jax.Array]:
    """`image_metrics` of each image of a batch: pred, target (B, H, W, C), mask (B, H, W) -> dict of (B,)."""
    _check_image_pair(pred, target, mask, batched=True)
    if mask is None:
        return jax.vmap(lambda p, t: _image_metrics(p, t, None, clip))(pred, target)
    return jax.vmap(lambda p, t, m: _image_metrics(p, t, m, clip))(pred, target, mask)


def cloudy_mask(cloud_prob: jax.Array, threshold: float = 0.5) -> jax.Array:
    """Cloudy pixels, cloud_prob > threshold: (..., H, W, 1) or (..., H, W) on [0, 1] -> bool (..., H, W)."""
    cloud_prob = jnp.asarray(cloud_prob)
    if cloud_prob.ndim >= 3 and cloud_prob.shape[-1] == 1:
        cloud_prob = cloud_prob[..., 0]
    return cloud_prob > threshold


class RunningMean:
    """Mean over images of per-image metrics, with counts; NaN values are skipped per metric.

    Matches UnCRtainTS / EMRDM `avg_img_metrics`: each metric keeps its own count of non-NaN images (an image
    with a zero pixel vector has SAM NaN and is left out of the SAM mean only); +inf (PSNR of a perfect image)
    is kept, so it makes the PSNR mean inf as theirs does. Host-side float64 accumulation.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.num_images = 0

    def update(self, metrics: Mapping[str, jax.Array | np.ndarray | float]) -> None:
        """Adds per-image metrics: a dict of scalars (one image) or of (B,) arrays (a batch)."""
        sizes = set()
        for name, value in metrics.items():
            values = np.asarray(jax.device_get(value), dtype=np.float64).reshape(-1)
            sizes.add(values.size)
            finite_or_inf = values[~np.isnan(values)]
            self._sums[name] = self._sums.get(name, 0.0) + float(np.sum(finite_or_inf))
            self._counts[name] = self._counts.get(name, 0) + int(finite_or_inf.size)
        if len(sizes) > 1:
            raise ValueError(f"RunningMean.update: metrics have different numbers of images {sorted(sizes)}")
        self.num_images += sizes.pop() if sizes else 0

    def merge(self, other: RunningMean) -> None:
        """Adds another accumulator's images (e.g. from another process)."""
        for name, total in other._sums.items():
            self._sums[name] = self._sums.get(name, 0.0) + total
            self._counts[name] = self._counts.get(name, 0) + other._counts[name]
        self.num_images += other.num_images

    @property
    def counts(self) -> dict[str, int]:
        """Number of non-NaN images behind each metric's mean."""
        return dict(self._counts)

    def mean(self) -> dict[str, float]:
        """Mean over images of each metric; NaN for a metric that has no non-NaN image."""
        return {
            name: (self._sums[name] / count if count else math.nan) for name, count in self._counts.items()
        }
