"""The FLUX autoencoder (BFL's flux/modules/autoencoder.py layout) in Flax NNX, channels last, any band count.

    x (B, H, W, in_channels) in [-1, 1]
      -> Encoder: conv_in; per level num_res_blocks ResnetBlocks and (except the last level) a stride-2
         Downsample; mid ResnetBlock / single-head attention / ResnetBlock; GroupNorm, swish, conv_out
      -> moments (B, H/8, W/8, 2 * z_channels) = [mean | logvar] -> DiagonalGaussian
      -> Decoder (mirror image, nearest-neighbour Upsample, num_res_blocks + 1 ResnetBlocks per level)
      -> (B, H, W, out_ch)

Module and attribute names follow BFL's (encoder.down[i].block[j].norm1, encoder.mid.attn_1.q, ...), so
BFL checkpoints map onto parameter paths one to one (crrf_jax.models.port). The mid attention's q/k/v/proj_out
are 1x1 convolutions in BFL; here they are Linear layers on the channel axis (the same map).

Latent scaling: `encode` returns `scale_factor * (z - shift_factor)` and `decode` inverts it. Both factors
live in the module as non-trainable `LatentStat` variables (initialised from the config), so they are saved
with the weights in checkpoints and bundles and can be set after the latent statistics are measured:
`model.set_latent_stats(scale_factor=..., shift_factor=...)`. Optimisers built over `nnx.Param` never touch
them. Training uses the unscaled posterior (`encode_posterior`, `__call__`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import einops
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from crrf_jax.parallel import with_axes

# PyTorch's default conv/linear init (kaiming_uniform with a = sqrt(5)): uniform with variance 1 / (3 fan_in).
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()
_LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance (LDM / diffusers)


@dataclasses.dataclass(frozen=True)
class AutoEncoderConfig:
    """BFL's AutoEncoderParams plus `norm_groups`. Defaults: FLUX.1's autoencoder (3 bands, 16 latents).

    scale_factor / shift_factor only initialise the model's LatentStat variables; configs/common.py sets 1 / 0
    until the statistics are measured on training data. `resolution` is informational (BFL keeps it too).
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        sizes = ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "norm_groups")
        for name in sizes:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AutoEncoderConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"AutoEncoderConfig.ch_mult must be positive integers, got {self.ch_mult}")
        bad = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups})
        if bad:
            raise ValueError(
                f"AutoEncoderConfig: norm_groups={self.norm_groups} does not divide the channel counts {bad} "
                f"(ch={self.ch}, ch_mult={self.ch_mult})"
            )
        if self.scale_factor == 0:
            raise ValueError("AutoEncoderConfig.scale_factor must be non-zero")

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the encoder: 2 ** (len(ch_mult) - 1) (8 for every variant we ship)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> AutoEncoderConfig:
        """From a dict or ConfigDict (configs/common.py's autoencoder_config); unknown keys fail."""
        items = dict(cfg.items())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"autoencoder config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**items)


def as_autoencoder_config(cfg: AutoEncoderConfig | Mapping[str, Any]) -> AutoEncoderConfig:
    return cfg if isinstance(cfg, AutoEncoderConfig) else AutoEncoderConfig.from_mapping(cfg)


class LatentStat(nnx.Variable):
    """A non-trainable scalar of the latent scaling (scale_factor, shift_factor); float32, shape ()."""


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder posterior N(mean, exp(logvar)), channels last. mean, logvar: (B, h, w, z) float32."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """moments (B, h, w, 2z) = [mean | logvar] along channels; logvar is clamped to [-30, 20] as in
        LDM / diffusers (BFL does not clamp; the two agree wherever logvar is in range)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *_LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * eps with eps ~ N(0, 1) drawn from the PRNG key `rng`."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(posterior || N(0, 1)) per sample, summed over h, w and channels: (B,) float32, >= 0."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int, *, dtype, rngs: nnx.Rngs, stride=1, padding=None) -> nnx.Conv:
    """A conv with kernel (kernel_h, kernel_w, conv_in, conv_out); 'same' zero padding unless given."""
    pad = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=with_axes(_KERNEL_INIT, "kernel_h", "kernel_w", "conv_in", "conv_out"),
        bias_init=with_axes(_ZEROS, "conv_out"),
        rngs=rngs,
    )


def _linear(cin: int, cout: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A per-pixel linear map (a 1x1 conv): kernel (conv_in, conv_out)."""
    return nnx.Linear(
        cin,
        cout,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=with_axes(_KERNEL_INIT, "conv_in", "conv_out"),
        bias_init=with_axes(_ZEROS, "conv_out"),
        rngs=rngs,
    )


def _group_norm(channels: int, groups: int, *, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=with_axes(_ONES, "norm"),
        bias_init=with_axes(_ZEROS, "norm"),
        rngs=rngs,
    )


class ResnetBlock(nnx.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), with a 1x1 nin_shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _group_norm(cin, groups, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = _group_norm(cout, groups, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        self.nin_shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nnx.Module):
    """x + proj_out(attention(q, k, v)) over all h*w pixels, one head of width `channels`."""

    def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.norm = _group_norm(channels, groups, dtype=dtype, rngs=rngs)
        self.q = _linear(channels, channels, dtype=dtype, rngs=rngs)
        self.k = _linear(channels, channels, dtype=dtype, rngs=rngs)
        self.v = _linear(channels, channels, dtype=dtype, rngs=rngs)
        self.proj_out = _linear(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _, height, width, _ = x.shape
        h = self.norm(x)
        tokens = [einops.rearrange(f(h), "b h w c -> b (h w) 1 c") for f in (self.q, self.k, self.v)]
        out = jax.nn.dot_product_attention(*tokens)  # scale 1/sqrt(c), softmax in float32
        out = einops.rearrange(out, "b (h w) 1 c -> b h w c", h=height, w=width)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Zero-pad one pixel at bottom and right, then a 3x3 stride-2 conv: (B, H, W, C) -> (B, H/2, W/2, C)."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, H, W, C) -> (B, 2H, 2W, C)."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(einops.repeat(x, "b h w c -> b (h 2) (w 2) c"))


class MidBlock(nnx.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs)
        self.attn_1 = AttnBlock(channels, groups, dtype=dtype, rngs=rngs)
        self.block_2 = ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nnx.Module):
    """One resolution level: ResnetBlocks (`block`), then an optional `downsample` or `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], *, downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        self.block = nnx.List(blocks)
        self.downsample = downsample
        self.upsample = upsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.block:
            x = block(x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


class Encoder(nnx.Module):
    """(B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * z_channels), f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, cfg: AutoEncoderConfig, *, dtype, rngs: nnx.Rngs):
        g = cfg.norm_groups
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, dtype=dtype, rngs=rngs)
        levels, cin = [], cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, g, dtype=dtype, rngs=rngs))
                cin = cout
            last = i == len(cfg.ch_mult) - 1
            levels.append(Level(blocks, downsample=None if last else Downsample(cin, dtype=dtype, rngs=rngs)))
        self.down = nnx.List(levels)
        self.mid = MidBlock(cin, g, dtype=dtype, rngs=rngs)
        self.norm_out = _group_norm(cin, g, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(cin, 2 * cfg.z_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """(B, h, w, z_channels) -> (B, h*f, w*f, out_ch). up[i] is level i (up[0]: full resolution), as BFL."""

    def __init__(self, cfg: AutoEncoderConfig, *, dtype, rngs: nnx.Rngs):
        g = cfg.norm_groups
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, cin, 3, dtype=dtype, rngs=rngs)
        self.mid = MidBlock(cin, g, dtype=dtype, rngs=rngs)
        levels = {}
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, g, dtype=dtype, rngs=rngs))
                cin = cout
            levels[i] = Level(blocks, upsample=Upsample(cin, dtype=dtype, rngs=rngs) if i else None)
        self.up = nnx.List([levels[i] for i in range(len(cfg.ch_mult))])
        self.norm_out = _group_norm(cin, g, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(cin, cfg.out_ch, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------------------
# The autoencoder
# ------------------------------------------------------------------------------------------------------------


class AutoEncoder(nnx.Module):
    """The FLUX VAE for any band count. Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16).

    Outputs (posterior moments, latents, reconstructions) are float32 whatever the compute dtype.
    """

    def __init__(self, config: AutoEncoderConfig | Mapping[str, Any], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = as_autoencoder_config(config)
        self.dtype = dtype
        self.encoder = Encoder(self.config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(self.config, dtype=dtype, rngs=rngs)
        self.scale_factor = LatentStat(jnp.asarray(self.config.scale_factor, jnp.float32))
        self.shift_factor = LatentStat(jnp.asarray(self.config.shift_factor, jnp.float32))

    def set_latent_stats(self, scale_factor: float | jax.Array, shift_factor: float | jax.Array) -> None:
        """Replaces the latent scaling (scalars) used by `encode` and `decode`, e.g. after measuring them."""
        if float(scale_factor) == 0.0:
            raise ValueError("scale_factor must be non-zero")
        self.scale_factor.set_value(jnp.asarray(scale_factor, jnp.float32).reshape(()))
        self.shift_factor.set_value(jnp.asarray(shift_factor, jnp.float32).reshape(()))

    def encode_posterior(self, x: jax.Array) -> DiagonalGaussian:
        """x (B, H, W, in_channels) in [-1, 1], H, W multiples of 8 -> unscaled posterior (B, H/8, W/8, z)."""
        self._check_image(x)
        return DiagonalGaussian.from_moments(self.encoder(x.astype(self.dtype)))

    def encode(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x (B, H, W, in_channels) in [-1, 1] -> scaled latents (B, H/8, W/8, z_channels) float32:
        scale_factor * (z - shift_factor), z the posterior mean, or a posterior sample when `rng` is given."""
        posterior = self.encode_posterior(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.scale_factor.get_value() * (z - self.shift_factor.get_value())

    def decode(self, z: jax.Array) -> jax.Array:
        """Scaled latents (B, h, w, z_channels) -> images (B, h*8, w*8, out_ch) float32, nominally [-1, 1]."""
        self._check_latent(z)
        z = z.astype(jnp.float32) / self.scale_factor.get_value() + self.shift_factor.get_value()
        return self.decoder(z.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        """Training pass: (reconstruction (B, H, W, out_ch) float32, posterior). The decoder sees an unscaled
        posterior sample drawn with `rng` (the posterior mean when `rng` is None)."""
        posterior = self.encode_posterior(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decoder(z.astype(self.dtype)).astype(jnp.float32), posterior

    def _check_image(self, x: jax.Array) -> None:
        cfg, f = self.config, self.config.downsample_factor
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"AutoEncoder expects images (B, H, W, {cfg.in_channels}) channels last, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"AutoEncoder: image height and width must be multiples of {f} (2 ** (len(ch_mult) - 1)), "
                f"got {x.shape[1]}x{x.shape[2]}"
            )

    def _check_latent(self, z: jax.Array) -> None:
        if z.ndim != 4 or z.shape[-1] != self.config.z_channels:
            raise ValueError(
                f"AutoEncoder.decode expects latents (B, h, w, {self.config.z_channels}), "
                f"got shape {tuple(z.shape)}"
            )

