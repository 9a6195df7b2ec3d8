"""EMRDM's metrics of its RGB(N) benchmarks (CUHK-CR1, CUHK-CR2): PSNR and SSIM of 8-bit images, and LPIPS.

EMRDM scores CUHK-CR with `sgm/modules/learning/evaluator.py::img_metrics` (selected by `image_metrics:
"evaluator"` in `configs/example_training/cuhk.yaml` and `cuhkv2.yaml`; repository Ly403/EMRDM, itself from
littlebeen/DDPM-Enhancement-for-Cloud-Removal), with scikit-image 0.24 and lpips 0.1.4 (its
requirements.txt). Per image, channels as the model predicts them (CUHK-CR: R, G, B, NIR, all four):

- 8-bit images: a [0, 1] image x becomes trunc(clamp(((x * 2 - 1) + 1) * 127.5, 0, 255)) as uint8 (float32
  arithmetic, then a cast: truncation, not rounding), prediction and target alike (`to_uint8`).
- PSNR: `skimage.metrics.peak_signal_noise_ratio(..., data_range=255)` of the (H, W, C) uint8 images: one
  MSE over all pixels and all C channels, 10 log10(255^2 / MSE); identical images give +inf.
- SSIM: scikit-image `structural_similarity(gray_a, gray_b, data_range=255)` with its defaults: a 7x7 uniform
  window, sample covariances (N / (N - 1), N = 49), K1 = 0.01, K2 = 0.03, the map averaged after cropping 3
  pixels at each border. It sees one grey image: the (H, W, 3) image times (0.298912, 0.586611, 0.114478)
  (`LUMA`). With 3 channels that is the luminance of the RGB image. With any other channel count (EMRDM's
  4-channel branch) each channel is repeated to 3 and scored alone (so grey = the channel times
  sum(LUMA) = 1.000001), and the image's SSIM is the mean over channels.
- LPIPS: `lpips.LPIPS(net='alex', version=0.1)` on the uint8 values as float, 0..255, not the [-1, 1] the
  network expects, and without the package's input scaling layer: `version=0.1` is a float, and the package
  applies the scaling layer only when `version == '0.1'` (a string). 3 channels: the RGB image; otherwise each
  channel repeated to 3 and the mean over channels. We reproduce all of this (`crrf_jax.models.lpips`,
  `scale_inputs=False`); the weights are v0.1's (the package formats the float into the same file name).

Our SSIM sums 7x7 windows of the integer images (and of their products) exactly in int32 and forms
N sum(ab) - sum(a) sum(b) in integers, so the variances carry no float32 cancellation; it matches
scikit-image's float64 result to ~1e-6. PSNR is float32 (~1e-6 dB off).

Not covered here, on purpose: EMRDM's Sen2_MTC_New figures come from its other scorer,
`sgm/modules/learning/metrics.py` (UnCRtainTS's PSNR / SSIM / SAM on [0, 1], plus `lpips.LPIPS(net='alex')`
with the scaling layer on x * 2 - 1 when the prediction has 3 channels), after `sgm/util.py::sen_mtc_scale_01`,
which rounds to DN, clips R, G, B to [0, 2000] and min-max stretches each image to [0, 1]; the model there
predicts R, G, B only. That is not an 8-bit score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LUMA = (0.298912, 0.586611, 0.114478)  # EMRDM's grey weights (caculate_ssim)
WINDOW = 7  # scikit-image's default uniform SSIM window
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2
RGB_BANDS = ("B04", "B03", "B02")  # R, G, B in crrf_jax.data.contract.S2_BANDS names
NIR_BAND = "B08"
METRIC_NAMES = ("psnr_255", "ssim_255")  # + "lpips" when an LPIPS network is given


def to_uint8(x: jax.Array) -> jax.Array:
    """EMRDM's [0, 1] -> 8-bit map, trunc(clamp(((x * 2 - 1) + 1) * 127.5, 0, 255)), as float32 integers.

    In that float32 order, rounding included: it is not trunc(x * 255), e.g. x = k / 255 gives k - 1 for
    k = 1..63 (in EMRDM as here). The barrier keeps XLA from simplifying the expression to x * 255 under jit.
    """
    x = jnp.asarray(x, jnp.float32)
    centred = lax.optimization_barrier(x * 2.0 - 1.0)
    return jnp.trunc(jnp.clip((centred + 1.0) * 127.5, 0.0, 255.0))


def psnr_255(a8: jax.Array, b8: jax.Array) -> jax.Array:
    """PSNR (dB, peak 255) of two 8-bit (H, W, C) images: one MSE over all pixels and channels."""
    diff = jnp.asarray(a8, jnp.float32) - jnp.asarray(b8, jnp.float32)
    return 10.0 * jnp.log10(255.0**2 / jnp.mean(diff * diff))


def _window_sums(x: jax.Array) -> jax.Array:
    """Sums over every 7x7 window inside the image: (H, W, ...) -> (H - 6, W - 6, ...), same dtype (rows, then
    columns: exact for integers)."""
    for size in ((WINDOW, 1), (1, WINDOW)):
        size = size + (1,) * (x.ndim - 2)
        x = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, size, (1,) * x.ndim, "VALID")
    return x


def grey_ssim(a8: jax.Array, b8: jax.Array, weights: Sequence[float]) -> jax.Array:
    """scikit-image's default SSIM (data_range 255) of the grey images a8 @ weights and b8 @ weights.

    a8, b8: (H, W, K) integer-valued 8-bit images (H, W >= 7); weights: K grey weights. Window sums of the
    channels and of their pairwise products are exact int32 (at most 49 * 255^2 * 49 < 2^31), so every local
    (co)variance is a weighted sum of exact integers N sum(a_i b_j) - sum(a_i) sum(b_j).
    """
    a = jnp.asarray(a8).astype(jnp.int32)
    b = jnp.asarray(b8).astype(jnp.int32)
    w = jnp.asarray(weights, jnp.float32)
    ww = w[:, None] * w[None, :]
    n = WINDOW * WINDOW
    sa, sb = _window_sums(a), _window_sums(b)

    def outer(x, y):
        return x[..., :, None] * y[..., None, :]

    def covariance(x, y, sx, sy):  # the sample covariance of the grey windows, (H - 6, W - 6)
        exact = n * _window_sums(outer(x, y)) - outer(sx, sy)
        return jnp.sum(exact.astype(jnp.float32) * ww, axis=(-2, -1)) / (n * (n - 1))

    mu_a = jnp.sum(sa.astype(jnp.float32) * w, axis=-1) / n
    mu_b = jnp.sum(sb.astype(jnp.float32) * w, axis=-1) / n
    var_a, var_b, cov = covariance(a, a, sa, sa), covariance(b, b, sb, sb), covariance(a, b, sa, sb)
    numerator = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return jnp.mean(numerator / denominator)


def ssim_255(a8: jax.Array, b8: jax.Array) -> jax.Array:
    """EMRDM's SSIM of two 8-bit (H, W, C) images: of the luminance when C == 3, else the mean over channels."""
    if a8.shape[-1] == 3:
        return grey_ssim(a8, b8, LUMA)
    per_channel = jax.vmap(lambda x, y: grey_ssim(x[..., None], y[..., None], (sum(LUMA),)), in_axes=-1)
    return jnp.mean(per_channel(a8, b8))


def lpips_255(lpips, a8: jax.Array, b8: jax.Array) -> jax.Array:
    """EMRDM's LPIPS of 8-bit batches (B, H, W, C) -> (B,): the network (`crrf_jax.models.lpips.LPIPS`, built
    with scale_inputs=False as EMRDM's runs) on the 0..255 values; RGB when C == 3, else the mean over channels
    of each channel repeated to 3."""
    a8 = jnp.asarray(a8, jnp.float32)
    b8 = jnp.asarray(b8, jnp.float32)
    if a8.shape[-1] == 3:
        return lpips(a8, b8)
    batch, height, width, channels = a8.shape

    def per_channel(x):  # (B, H, W, C) -> (B * C, H, W, 3), channel-major within each image
        x = jnp.moveaxis(x, -1, 1).reshape(batch * channels, height, width, 1)
        return jnp.repeat(x, 3, axis=-1)

    return jnp.mean(lpips(per_channel(a8), per_channel(b8)).reshape(batch, channels), axis=1)


def batch_metrics_255(pred: jax.Array, target: jax.Array, lpips=None) -> dict[str, jax.Array]:
    """EMRDM's CUHK-CR metrics of each image of a batch: pred, target (B, H, W, C) on [0, 1] ->
    {"psnr_255", "ssim_255" and, with an LPIPS network, "lpips"}: (B,) float32. jit-able."""
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"rgb_metrics: pred and target must be (B, H, W, C) of one shape, got {pred.shape} "
                         f"and {target.shape}")
    p8, t8 = to_uint8(pred), to_uint8(target)
    out = {"psnr_255": jax.vmap(psnr_255)(p8, t8), "ssim_255": jax.vmap(ssim_255)(p8, t8)}
    if lpips is not None:
        out["lpips"] = lpips_255(lpips, p8, t8)
    return out


def emrdm_channels(band_names: Sequence[str]) -> tuple[int, ...]:
    """Positions in `band_names` of the channels EMRDM's RGB(N) scorer sees: R, G, B (B04, B03, B02) and NIR
    (B08) when the model has it, in that order (CUHK-CR's models predict R, G, B, NIR)."""
    names = list(band_names)
    missing = [b for b in RGB_BANDS if b not in names]
    if missing:
        raise ValueError(f"metric set 'rgb255' needs the bands {', '.join(RGB_BANDS)} (R, G, B); the model's "
                         f"bands {', '.join(names)} lack {', '.join(missing)}")
    return tuple(names.index(b) for b in (*RGB_BANDS, *([NIR_BAND] if NIR_BAND in names else [])))


class RGB255Scorer:
    """Scores a batch of every method the way EMRDM scores CUHK-CR (`batch_metrics_255`), on the channels
    `emrdm_channels(band_names)` picks; with `lpips_weights` (a safetensors file, see
    `crrf_jax.models.lpips`) LPIPS too. One compiled program per batch shape."""

    def __init__(self, band_names: Sequence[str], lpips_weights: str | None = None):
        from flax import nnx

        from crrf_jax.models import lpips as lpips_lib

        self.channels = emrdm_channels(band_names)
        self.bands = [list(band_names)[i] for i in self.channels]
        self.lpips_weights = lpips_weights or None
        graph, state = None, None
        if self.lpips_weights:
            graph, state = nnx.split(lpips_lib.load_lpips(self.lpips_weights, scale_inputs=False))
        self._state = state
        channels = list(self.channels)

        def score(methods, target, state):
            network = None if graph is None else nnx.merge(graph, state)
            return {name: batch_metrics_255(pred[..., channels], target[..., channels], network)
                    for name, pred in methods.items()}

        self._score = jax.jit(score)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRIC_NAMES + (("lpips",) if self.lpips_weights else ())

    def __call__(self, methods: Mapping[str, np.ndarray], target: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """{method: (B, H, W, C) on [0, 1]}, target (B, H, W, C) -> host {method: {metric: (B,)}}."""
        methods = {name: jnp.asarray(pred, jnp.float32) for name, pred in methods.items()}
        return jax.device_get(self._score(methods, jnp.asarray(target, jnp.float32), self._state))
