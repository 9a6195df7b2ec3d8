"""EMRDM's metrics of its RGB(N) benchmarks: CUHK-CR1 / CUHK-CR2 ("rgb255": PSNR and SSIM of 8-bit images,
and LPIPS) and Sen2_MTC_New ("sen2mtc": PSNR / SSIM / SAM of per-image stretched RGB images, and LPIPS).

Metric set "rgb255" (`batch_metrics_255`, `RGB255Scorer`). EMRDM scores CUHK-CR with
`sgm/modules/learning/evaluator.py::img_metrics` (selected by `image_metrics: "evaluator"` in `configs/example_training/cuhk.yaml` and `cuhkv2.yaml`; repository Ly403/EMRDM, itself from
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

Metric set "sen2mtc" (`batch_metrics_sen2mtc`, `Sen2MTCScorer`). EMRDM scores Sen2_MTC_New with its default
scorer (`image_metrics: "metrics"`, `sgm/models/diffusion.py::TemporalResidualDiffusionEngine`): each image
of the batch (batch size 1) goes through `scale_01`, here `sgm/util.py::sen_mtc_scale_01`
(`configs/example_training/sen2_mtc_new.yaml`), target and prediction alike, then
`sgm/modules/learning/metrics.py::img_metrics`. Its model predicts R, G, B only (`out_channels: 3`; the target
`gt_image` is the clear image's first 3 bands), so we score the R, G, B bands (B04, B03, B02) of our 4-band
predictions:

- `sen_mtc_scale_01` of a 3-channel image v in EMRDM's network space ([-1, 1], v = (DN / 10000 - 0.5) / 0.5):
  DN = trunc(clamp((v * 0.5 + 0.5) * 10000 + 0.5, 0, 10000)) as int64 (float32 steps, so DN rounded to the
  nearest), each channel clipped to [0, 2000], minus the image's minimum (over all pixels and the 3 channels),
  divided by the image's maximum of that (float32); an image constant after clipping becomes all ones. Its
  NaN handling never fires (the values are integers). Ours (`sen_mtc_stretch`) takes our [0, 1] images x,
  forms v = x * 2 - 1 (in float32 equal to EMRDM's (x - 0.5) / 0.5) and follows the same float32 steps: a
  target's DN come back exactly; a prediction can differ from EMRDM's only where it lies within float32
  rounding of a half-DN.
- `img_metrics` of those [0, 1] images, unclipped: UnCRtainTS's RMSE, MAE, PSNR = 20 log10(1 / RMSE), SAM
  (degrees) and SSIM (its `pytorch_ssim`: 11x11 Gaussian window, sigma 1.5, zero padding, C1 = 0.01^2,
  C2 = 0.03^2, the map averaged over channels and pixels) over the 3 channels: exactly
  `crrf_jax.metrics.batch_metrics(..., clip=False)` (see its docstring), named "<metric>_mtc" here.
- LPIPS ("lpips_mtc"): `lpips.LPIPS(net='alex', verbose=False)` (version '0.1', a string: with the input
  scaling layer) of (target * 2 - 1, pred * 2 - 1) of the stretched images, as the prediction has 3 channels:
  `crrf_jax.models.lpips` with `scale_inputs=True`.
- A test set's figure is the mean over images, NaN values left out (`avg_img_metrics`; `metrics.RunningMean`):
  SAM is NaN for an image with a pixel whose 3 stretched values are all 0 (in theirs as in ours).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from crrf_jax import metrics as M

LUMA = (0.298912, 0.586611, 0.114478)  # EMRDM's grey weights (caculate_ssim)
WINDOW = 7  # scikit-image's default uniform SSIM window
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2
RGB_BANDS = ("B04", "B03", "B02")  # R, G, B in crrf_jax.data.contract.S2_BANDS names
NIR_BAND = "B08"
METRIC_NAMES = ("psnr_255", "ssim_255")  # + "lpips" when an LPIPS network is given
SEN2MTC_METRIC_NAMES = tuple(f"{m}_mtc" for m in M.METRIC_NAMES)  # + "lpips_mtc" when an LPIPS network is given
SEN2MTC_DN_MAX = 2000  # sen_mtc_scale_01 clips R, G, B to [0, 2000] DN before stretching


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


def sen_mtc_stretch(x: jax.Array) -> jax.Array:
    """EMRDM's `sen_mtc_scale_01` of one (H, W, 3) R, G, B image on [0, 1] (DN / 10000) -> (H, W, 3) float32
    on [0, 1]: DN rounded and clamped to [0, 10000], clipped to [0, 2000], minus the image's minimum, over its
    maximum (all ones when that is 0). The float32 steps are EMRDM's; barriers keep XLA from merging them."""
    x = jnp.asarray(x, jnp.float32)
    v = lax.optimization_barrier(x * 2.0 - 1.0)  # EMRDM's network space, (x - 0.5) / 0.5
    unit = lax.optimization_barrier(v * 0.5 + 0.5)
    dn = jnp.trunc(jnp.clip(lax.optimization_barrier(unit * 10000.0) + 0.5, 0.0, 10000.0))
    dn = jnp.clip(dn, 0.0, float(SEN2MTC_DN_MAX))
    shifted = dn - jnp.min(dn)
    top = jnp.max(shifted)
    # A true float32 division, as torch's: the barrier keeps XLA from turning x / broadcast(top) into
    # x * (1 / top), which is 1 ulp off for a quarter of the values.
    denominator = lax.optimization_barrier(jnp.broadcast_to(jnp.where(top == 0, 1.0, top), shifted.shape))
    return jnp.where(top == 0, jnp.ones_like(shifted), shifted / denominator)


def batch_metrics_sen2mtc(pred: jax.Array, target: jax.Array, lpips=None) -> dict[str, jax.Array]:
    """EMRDM's Sen2_MTC_New metrics of each image of a batch: pred, target (B, H, W, 3) R, G, B on [0, 1] ->
    {"<metric>_mtc" for `metrics.METRIC_NAMES` and, with an LPIPS network (scale_inputs=True), "lpips_mtc"}:
    (B,) float32. jit-able."""
    if pred.ndim != 4 or pred.shape != target.shape or pred.shape[-1] != 3:
        raise ValueError(f"rgb_metrics: pred and target must be (B, H, W, 3) R, G, B of one shape, got "
                         f"{pred.shape} and {target.shape}")
    p, t = jax.vmap(sen_mtc_stretch)(pred), jax.vmap(sen_mtc_stretch)(target)
    out = {f"{k}_mtc": v for k, v in M.batch_metrics(p, t, clip=False).items()}
    if lpips is not None:
        out["lpips_mtc"] = lpips(t * 2.0 - 1.0, p * 2.0 - 1.0)
    return out


def emrdm_channels(band_names: Sequence[str], nir: bool = True, metric_set: str = "rgb255") -> tuple[int, ...]:
    """Positions in `band_names` of the channels EMRDM's scorer of `metric_set` sees: R, G, B (B04, B03, B02)
    and, with `nir`, NIR (B08) when the model has it, in that order (CUHK-CR's models predict R, G, B, NIR;
    Sen2_MTC_New's predict R, G, B)."""
    names = list(band_names)
    missing = [b for b in RGB_BANDS if b not in names]
    if missing:
        raise ValueError(f"metric set {metric_set!r} needs the bands {', '.join(RGB_BANDS)} (R, G, B); the "
                         f"model's bands {', '.join(names)} lack {', '.join(missing)}")
    return tuple(names.index(b) for b in (*RGB_BANDS, *([NIR_BAND] if nir and NIR_BAND in names else [])))


class _EMRDMScorer:
    """Scores a batch of every method with a metric set's `batch` function on the channels it picks; with
    `lpips_weights` (a safetensors file, see `crrf_jax.models.lpips`) LPIPS too. One compiled program per
    batch shape. Subclasses set the class attributes."""

    metric_set: str
    base_names: tuple[str, ...]
    lpips_name: str
    nir: bool  # whether B08 joins R, G, B
    scale_inputs: bool  # the LPIPS input scaling layer
    batch = None  # (pred, target, lpips or None) -> {metric: (B,)}

    def __init__(self, band_names: Sequence[str], lpips_weights: str | None = None):
        from flax import nnx

        from crrf_jax.models import lpips as lpips_lib

        self.channels = emrdm_channels(band_names, self.nir, self.metric_set)
        self.bands = [list(band_names)[i] for i in self.channels]
        self.lpips_weights = lpips_weights or None
        graph, state = None, None
        if self.lpips_weights:
            graph, state = nnx.split(lpips_lib.load_lpips(self.lpips_weights, scale_inputs=self.scale_inputs))
        self._state = state
        channels, batch = list(self.channels), type(self).batch

        def score(methods, target, state):
            network = None if graph is None else nnx.merge(graph, state)
            return {name: batch(pred[..., channels], target[..., channels], network)
                    for name, pred in methods.items()}

        self._score = jax.jit(score)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.base_names + ((self.lpips_name,) if self.lpips_weights else ())

    def __call__(self, methods: Mapping[str, np.ndarray], target: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """{method: (B, H, W, C) on [0, 1]}, target (B, H, W, C) -> host {method: {metric: (B,)}}."""
        methods = {name: jnp.asarray(pred, jnp.float32) for name, pred in methods.items()}
        return jax.device_get(self._score(methods, jnp.asarray(target, jnp.float32), self._state))


class RGB255Scorer(_EMRDMScorer):
    """EMRDM's CUHK-CR scores (`batch_metrics_255`) on R, G, B (+ NIR); LPIPS without the scaling layer."""

    metric_set, base_names, lpips_name, nir, scale_inputs = "rgb255", METRIC_NAMES, "lpips", True, False
    batch = staticmethod(batch_metrics_255)


class Sen2MTCScorer(_EMRDMScorer):
    """EMRDM's Sen2_MTC_New scores (`batch_metrics_sen2mtc`) on R, G, B; LPIPS with the scaling layer."""

    metric_set, base_names, lpips_name, nir, scale_inputs = "sen2mtc", SEN2MTC_METRIC_NAMES, "lpips_mtc", False, True
    batch = staticmethod(batch_metrics_sen2mtc)
