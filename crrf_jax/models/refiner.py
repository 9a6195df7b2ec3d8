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
from flax import nnx

from crrf_jax.data import contract
from crrf_jax.models.layers import DType, default_kernel_init, zeros_init
from crrf_jax.parallel import with_axes

SAR_BANDS = 2


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """bands: C, the Sentinel-2 bands of the model; width: feature channels; dilations: one residual block
    per entry (each two 3x3 convolutions, the first dilated)."""

    bands: int = 13
    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> RefinerConfig:
        return cls(int(cfg["bands"]), int(cfg["width"]), tuple(int(d) for d in cfg["dilations"]))

    @property
    def in_channels(self) -> int:
        """pred, cloudy, cloud_prob, SAR and a SAR-present flag."""
        return 2 * self.bands + 1 + SAR_BANDS + 1


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
        self.config = cfg
        self.stem = _conv(cfg.in_channels, cfg.width, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([_Block(cfg.width, d, dtype=dtype, rngs=rngs) for d in cfg.dilations])
        self.head = _conv(cfg.width, cfg.bands + 1, zero=True, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        pred: jax.Array,
        cloudy: jax.Array,
        cloud_prob: jax.Array,
        sar: jax.Array | None,
        sar_present: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """refined (B, H, W, C) and trust (B, H, W, 1), float32; inputs as in the module docstring.

        sar_present: optional (B,) bool; False marks a sample as SAR-absent (as `sar=None` does for all),
        which is how training teaches the SAR-absent mode.
        """
        c = self.config.bands
        if pred.shape != cloudy.shape or pred.ndim != 4 or pred.shape[-1] != c:
            raise ValueError(f"pred {pred.shape} and cloudy {cloudy.shape} must both be (B, H, W, {c})")
        if cloud_prob.shape != (*pred.shape[:3], 1):
            raise ValueError(f"cloud_prob must be {(*pred.shape[:3], 1)}, got {cloud_prob.shape}")
        if sar is not None and sar.shape != (*pred.shape[:3], SAR_BANDS):
            raise ValueError(f"sar must be {(*pred.shape[:3], SAR_BANDS)} or None, got {sar.shape}")
        pred, cloudy = pred.astype(jnp.float32), cloudy.astype(jnp.float32)
        if sar is None:
            present = jnp.zeros_like(cloud_prob, jnp.float32)
            sar = jnp.zeros((*pred.shape[:3], SAR_BANDS), jnp.float32)
        else:
            flags = jnp.ones(pred.shape[:1]) if sar_present is None else jnp.asarray(sar_present, jnp.float32)
            present = jnp.broadcast_to(flags[:, None, None, None], cloud_prob.shape).astype(jnp.float32)
            sar = contract.to_model(sar.astype(jnp.float32)) * present
        x = jnp.concatenate([contract.to_model(pred), contract.to_model(cloudy),
                             contract.to_model(cloud_prob.astype(jnp.float32)), sar, present], axis=-1)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        out = self.head(jax.nn.swish(h)).astype(jnp.float32)
        residual, trust = out[..., :c], jax.nn.sigmoid(out[..., c:])
        return blend(pred + residual, cloudy, trust), trust


def blend(restored: jax.Array, cloudy: jax.Array, trust: jax.Array) -> jax.Array:
    """trust * cloudy + (1 - trust) * restored; trust (B, H, W, 1) in [0, 1] broadcasts over bands."""
    return trust * cloudy + (1.0 - trust) * restored

