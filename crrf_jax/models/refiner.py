"""Refiner: the pixel-space stage after the latent flow. It keeps what is clear and restores what the latent loses.

The flow model works on an 8x-downsampled, 16-channel latent: its decoded prediction is blurred, and a VAE
round trip changes even the clear pixels. The refiner looks at full resolution at

    pred        (B, H, W, C)  the flow's decoded prediction, reflectance in [0, 1]
    cloudy      (B, H, W, C)  the cloudy input, reflectance in [0, 1]
    cloud_prob  (B, H, W, 1)  s2cloudless probability in [0, 1]
    sar         (B, H, W, 2)  Sentinel-1 VV, VH in [0, 1], or None (SAR absent)

and outputs a residual r (B, H, W, C) and a trust mask m = sigmoid(logit) (B, H, W, 1) in (0, 1):

    refined = m * cloudy + (1 - m) * (pred + r)

so m = 1 keeps an input pixel as it came, m = 0 takes the restored prediction. The mask is learned, not a
threshold of the cloud probability: shadows and haze that s2cloudless misses get a low trust too.

With `gain` the kept pixel may be brightened or darkened by one learned factor g (B, H, W, 1), the same for
every band: refined = m * g * cloudy + (1 - m) * (pred + r). A cloud shadow (and, roughly, thin haze over
dark ground) scales a pixel's bands alike, so g undoes it while keeping the pixel's own spectral shape, which
a restored prediction only approximates band by band. g = exp(2 tanh(l / 2)) in (e^-2, e^2), 1 at
initialisation.

Several cloudy dates (B, T, H, W, C), with their maps (B, T, H, W, 1) and SAR: `cloudy`, `cloud_prob` and
`sar` above are then the dates' least-cloudy composite (`temporal.single_view`; what m keeps), and a refiner
built for `dates` > 1 also sees every date on its own: its image, cloud probability and a present flag, up to
`dates` of them (a date the sample lacks, or a dropped one, is zeros with the flag off). So r can draw on
every date rather than one date a pixel (a shadow, for one, is a pixel darker than on its other clear dates).
With `dates` = 1 the inputs are exactly the single-image ones.

The network is a stem convolution, residual blocks of dilated 3x3 convolutions (dilations grow, so the
receptive field spans tens of pixels at a few layers' cost) and a zero-initialised head: at initialisation
r = 0 and m = 1/2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from crrf_jax import temporal
from crrf_jax.data import contract
from crrf_jax.models.layers import DType, default_kernel_init, zeros_init
from crrf_jax.parallel import with_axes

SAR_BANDS = 2


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """bands: C, the Sentinel-2 bands of the model; width: feature channels; dilations: one residual block
    per entry (each two 3x3 convolutions, the first dilated); dates: the most cloudy dates it sees one by one
    (the model's max_dates; 1 = single image); gain: the kept pixel's learned brightness factor.
    """

    bands: int = 13
    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    dates: int = 1
    gain: bool = False

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], dates: int = 1) -> RefinerConfig:
        """From `config.model.refiner`; `dates` is `config.model.max_dates` (the model's, not the refiner's)."""
        return cls(int(cfg["bands"]), int(cfg["width"]), tuple(int(d) for d in cfg["dilations"]), int(dates),
                   bool(cfg.get("gain", False)))

    @property
    def out_channels(self) -> int:
        """The residual's bands, the trust logit and, with `gain`, the log-gain."""
        return self.bands + 1 + int(self.gain)

    @property
    def in_channels(self) -> int:
        """pred, cloudy, cloud_prob, SAR and a SAR-present flag; with several dates also each date's image,
        cloud probability and present flag."""
        per_date = self.dates * (self.bands + 2) if self.dates > 1 else 0
        return 2 * self.bands + 1 + SAR_BANDS + 1 + per_date


def _conv(cin: int, cout: int, *, dilation: int = 1, zero: bool = False, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    kernel_init = zeros_init if zero else default_kernel_init
    return nnx.Conv(
        cin, cout, (3, 3), padding="SAME", kernel_dilation=dilation, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=with_axes(kernel_init, "kernel_h", "kernel_w", "conv_in", "conv_out"),
        bias_init=with_axes(zeros_init, "conv_out"), rngs=rngs,
    )


class _Block(nnx.Module):
    """x + conv(swish(conv_dilated(swish(x))))."""

    def __init__(self, width: int, dilation: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(width, width, dilation=dilation, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(jax.nn.swish(self.conv1(jax.nn.swish(x))))


class Refiner(nnx.Module):
    """(pred, cloudy, cloud_prob, sar) -> (refined, trust); see the module docstring for the semantics."""

    def __init__(self, cfg: RefinerConfig | Mapping[str, Any], *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        cfg = cfg if isinstance(cfg, RefinerConfig) else RefinerConfig.from_mapping(cfg)
        if not cfg.dilations:
            raise ValueError("Refiner needs at least one residual block (dilations is empty)")
        if cfg.dates < 1:
            raise ValueError(f"Refiner dates must be at least 1, got {cfg.dates}")
        self.config = cfg
        self.stem = _conv(cfg.in_channels, cfg.width, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([_Block(cfg.width, d, dtype=dtype, rngs=rngs) for d in cfg.dilations])
        self.head = _conv(cfg.width, cfg.out_channels, zero=True, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        pred: jax.Array,
        cloudy: jax.Array,
        cloud_prob: jax.Array,
        sar: jax.Array | None,
        sar_present: jax.Array | None = None,
        present: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """refined (B, H, W, C) and trust (B, H, W, 1), float32; inputs as in the module docstring.

        cloudy, cloud_prob, sar: one date (B, H, W, .) or T dates (B, T, H, W, .), T <= config.dates.
        sar_present: optional (B,) bool; False marks a sample as SAR-absent (as `sar=None` does for all),
        which is how training teaches the SAR-absent mode.
        present: optional (B, T) bool, False = that date is absent (left out of the composite, zeros with the
        flag off in the per-date inputs); None = every date present.
        """
        c = self.config.bands
        if pred.ndim != 4 or pred.shape[-1] != c:
            raise ValueError(f"pred must be (B, H, W, {c}), got {pred.shape}")
        several = temporal.is_multitemporal(cloudy)
        dates = cloudy.shape[1] if several else 1
        if dates > self.config.dates:
            raise ValueError(f"{dates} cloudy dates, but this refiner takes at most dates={self.config.dates}")
        lead = (pred.shape[0], dates) if several else pred.shape[:1]
        if cloudy.shape != (*lead, *pred.shape[1:]):
            raise ValueError(f"pred {pred.shape} and cloudy {cloudy.shape} must both be (B, [T,] H, W, {c}) "
                             "images of one size and batch")
        if cloud_prob.shape != (*lead, *pred.shape[1:3], 1):
            raise ValueError(f"cloud_prob must be {(*lead, *pred.shape[1:3], 1)}, got {cloud_prob.shape}")
        if sar is not None and sar.shape != (*lead, *pred.shape[1:3], SAR_BANDS):
            raise ValueError(f"sar must be {(*lead, *pred.shape[1:3], SAR_BANDS)} or None, got {sar.shape}")
        if present is not None and (not several or jnp.shape(present) != lead):
            raise ValueError(f"present must be (B, T) = {lead} of (B, T, H, W, C) dates, got {jnp.shape(present)}")
        composite, composite_prob, composite_sar = temporal.single_view(cloudy, cloud_prob, sar, present)
        pred, composite = pred.astype(jnp.float32), composite.astype(jnp.float32)
        if composite_sar is None:
            sar_flag = jnp.zeros_like(composite_prob, jnp.float32)
            sar_in = jnp.zeros((*pred.shape[:3], SAR_BANDS), jnp.float32)
        else:
            flags = jnp.ones(pred.shape[:1]) if sar_present is None else jnp.asarray(sar_present, jnp.float32)
            sar_flag = jnp.broadcast_to(flags[:, None, None, None], composite_prob.shape).astype(jnp.float32)
            sar_in = contract.to_model(composite_sar.astype(jnp.float32)) * sar_flag
        inputs = [contract.to_model(pred), contract.to_model(composite),
                  contract.to_model(composite_prob.astype(jnp.float32)), sar_in, sar_flag]
        if self.config.dates > 1:
            inputs.append(self._every_date(cloudy, cloud_prob, present, several))
        h = self.stem(jnp.concatenate(inputs, axis=-1))
        for block in self.blocks:
            h = block(h)
        out = self.head(jax.nn.swish(h)).astype(jnp.float32)
        residual, trust = out[..., :c], jax.nn.sigmoid(out[..., c : c + 1])
        if self.config.gain:
            composite = composite * jnp.exp(2.0 * jnp.tanh(out[..., c + 1 :] / 2.0))
        return blend(pred + residual, composite, trust), trust

    def _every_date(self, cloudy, cloud_prob, present, several: bool) -> jax.Array:
        """(B, H, W, config.dates * (C + 2)): each date's image and cloud probability (model range) and its
        present flag, date-major; dates beyond the T given, and absent ones, are zeros with the flag off."""
        if not several:
            cloudy, cloud_prob = cloudy[:, None], cloud_prob[:, None]
        b, dates, hh, ww, _ = cloudy.shape
        flags = jnp.ones((b, dates), jnp.float32) if present is None else jnp.asarray(present, jnp.float32)
        flags = jnp.broadcast_to(flags[:, :, None, None, None], (b, dates, hh, ww, 1))
        per_date = jnp.concatenate([contract.to_model(cloudy.astype(jnp.float32)),
                                    contract.to_model(cloud_prob.astype(jnp.float32)), jnp.ones_like(flags)], -1)
        per_date = per_date * flags
        per_date = jnp.pad(per_date, ((0, 0), (0, self.config.dates - dates), (0, 0), (0, 0), (0, 0)))
        return rearrange(per_date, "b t h w c -> b h w (t c)")


def blend(restored: jax.Array, cloudy: jax.Array, trust: jax.Array) -> jax.Array:
    """trust * cloudy + (1 - trust) * restored; trust (B, H, W, 1) in [0, 1] broadcasts over bands."""
    return trust * cloudy + (1.0 - trust) * restored

