"""FLUX building blocks (BFL semantics) as Flax NNX modules.

Math follows black-forest-labs/flux `src/flux/modules/layers.py` and `math.py`, so BFL and diffusers weights
import exactly. Parameters are float32 and carry logical axis names (`crrf_jax.parallel.with_axes`); `dtype`
is the compute dtype of the matmuls (bfloat16 on accelerators). Norms, RoPE and the attention softmax run in
float32 whatever `dtype` is.

Shapes: B batch, L sequence length, H heads, D head dim, `hidden = H * D`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from crrf_jax.parallel import with_axes

DType = jnp.dtype | type
default_kernel_init = nnx.initializers.lecun_normal()
zeros_init = nnx.initializers.zeros


# ------------------------------------------------------------------------------------------------------------
# Functions: timestep embedding, RoPE, attention
# ------------------------------------------------------------------------------------------------------------


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10_000, time_factor: float = 1000.0
) -> jax.Array:
    """Sinusoidal embedding of `t` (B,) -> (B, dim) float32, [cos | sin] halves (BFL order).

    `t` is in [0, 1] for timesteps (scaled by `time_factor` first) or a guidance scale.
    """
    t = time_factor * jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.asarray(np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half), jnp.float32)
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def rope(pos: jax.Array, dim: int, theta: float) -> jax.Array:
    """Rotations for positions `pos` (B, L) on `dim` (even) channels -> (B, L, dim/2, 2, 2) float32."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even number of channels per axis, got {dim}")
    omega = jnp.asarray(1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim), jnp.float32)
    angles = jnp.asarray(pos, jnp.float32)[..., None] * omega  # (B, L, dim/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    mats = jnp.stack([cos, -sin, sin, cos], axis=-1)
    return rearrange(mats, "b l d (i j) -> b l d i j", i=2, j=2)


def embed_nd(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> jax.Array:
    """RoPE for n-d position ids (B, L, n) -> (B, 1, L, sum(axes_dim)/2, 2, 2) float32 (a head axis of 1)."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dim has {len(axes_dim)}")
    emb = jnp.concatenate([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], axis=-3)
    return emb[:, None]


class EmbedND(nnx.Module):
    """RoPE over several position axes (BFL's EmbedND); no parameters."""

    def __init__(self, axes_dim: Sequence[int], theta: float):
        self.axes_dim = tuple(int(d) for d in axes_dim)
        self.theta = float(theta)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return embed_nd(ids, self.axes_dim, self.theta)


def apply_rope(xq: jax.Array, xk: jax.Array, pe: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rotates queries and keys (B, H, L, D) by `pe` (B or 1, 1, L, D/2, 2, 2); computed in float32."""

    def rotate(x):
        pairs = rearrange(x.astype(jnp.float32), "... (d two) -> ... d 1 two", two=2)
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]  # (..., D/2, 2)
        return rearrange(out, "... d two -> ... (d two)").astype(x.dtype)

    return rotate(xq), rotate(xk)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, pe: jax.Array, key_mask: jax.Array | None = None
) -> jax.Array:
    """RoPE + scaled dot-product attention. q, k, v (B, H, L, D) -> (B, L, H*D) in v's dtype.

    key_mask: optional (B, L) bool, False = no query attends to that token (an absent date's tokens): every
    other token's output is then exactly what it would be without those tokens in the sequence.

    Through `jax.nn.dot_product_attention`: cuDNN's fused (flash) kernel on GPU for bf16/fp16 where cuDNN
    accepts the shapes, XLA's implementation otherwise (its softmax runs in float32). jax's own default
    (implementation=None) is XLA everywhere, so the GPU kernel is asked for explicitly.
    """
    q, k = apply_rope(q, k, pe)
    q, k, v = (rearrange(x.astype(v.dtype), "b h l d -> b l h d") for x in (q, k, v))
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, heads, queries, keys) broadcast
    out = None
    if jax.default_backend() == "gpu" and v.dtype in (jnp.bfloat16, jnp.float16):
        try:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # shapes or cuDNN version not supported
            out = None
    if out is None:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    return rearrange(out, "b l h d -> b l (h d)")


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str, str],
    *,
    dtype: DType,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    zero: bool = False,
) -> nnx.Linear:
    """nnx.Linear with float32 params named by logical `axes` (kernel (in, out); bias named after `out`)."""
    kernel_init = zeros_init if zero else default_kernel_init
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=with_axes(kernel_init, *axes),
        bias_init=with_axes(zeros_init, axes[1]),
        rngs=rngs,
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class MLPEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear: (..., in_dim) -> (..., hidden)."""

    def __init__(self, in_dim: int, hidden_dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.in_layer = linear(in_dim, hidden_dim, ("in_features", "mlp"), dtype=dtype, rngs=rngs)
        self.out_layer = linear(hidden_dim, hidden_dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis (eps 1e-6), computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(with_axes(nnx.initializers.ones, "norm")(rngs.params(), (dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
        return (x32 * rrms * self.scale[...]).astype(x.dtype)


class QKNorm(nnx.Module):
    """RMSNorm of queries and keys (per head), cast to the values' dtype."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.query_norm = RMSNorm(dim, rngs=rngs)
        self.key_norm = RMSNorm(dim, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class SelfAttention(nnx.Module):
    """The qkv projection, QK norm and output projection of one stream (the attention itself is joint)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, *, dtype: DType = jnp.float32, rngs: nnx.Rngs
    ):
        self.num_heads = num_heads
        self.qkv = linear(dim, 3 * dim, ("embed", "heads"), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.norm = QKNorm(dim // num_heads, rngs=rngs)
        self.proj = linear(dim, dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def split_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, L, dim) -> normed q, k and v, each (B, H, L, D)."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nnx.Module):
    """adaLN modulation from vec (B, dim): 3 (single) or 6 (double) chunks, each (B, 1, dim)."""

    def __init__(
        self, dim: int, double: bool, *, dtype: DType = jnp.float32, zero: bool = False, rngs: nnx.Rngs
    ):
        self.multiplier = 6 if double else 3
        self.lin = linear(dim, self.multiplier * dim, ("embed", "mlp"), dtype=dtype, zero=zero, rngs=rngs)

    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        out = self.lin(jax.nn.silu(vec))[:, None, :]
        return jnp.split(out, self.multiplier, axis=-1)  # shift, scale, gate (x 2 when double)


class Mlp(nnx.Module):
    """Linear -> GELU (tanh) -> Linear: (B, L, dim) -> (B, L, dim). BFL's img_mlp.0 / img_mlp.2."""

    def __init__(self, dim: int, hidden: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DoubleStreamBlock(nnx.Module):
    """MM-DiT block: image and text streams with their own weights and one joint attention.

    img (B, N, hidden), txt (B, M, hidden), vec (B, hidden), pe (B, 1, M+N, D/2, 2, 2) for [txt ; img].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = False,
        *,
        dtype: DType = jnp.float32,
        zero_init: bool = False,
        rngs: nnx.Rngs,
    ):
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True, dtype=dtype, zero=zero_init, rngs=rngs)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, dtype=dtype, rngs=rngs)
        self.img_mlp = Mlp(hidden_size, mlp_hidden, dtype=dtype, rngs=rngs)
        self.txt_mod = Modulation(hidden_size, double=True, dtype=dtype, zero=zero_init, rngs=rngs)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, dtype=dtype, rngs=rngs)
        self.txt_mlp = Mlp(hidden_size, mlp_hidden, dtype=dtype, rngs=rngs)

    def __call__(
        self, img: jax.Array, txt: jax.Array, vec: jax.Array, pe: jax.Array, key_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.split_heads((1 + i_scale1) * layer_norm(img) + i_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.split_heads((1 + t_scale1) * layer_norm(txt) + t_shift1)
        joint = lambda a, b: jnp.concatenate([a, b], axis=2)  # noqa: E731  (txt first, as BFL)
        attn = attention(joint(txt_q, img_q), joint(txt_k, img_k), joint(txt_v, img_v), pe, key_mask)
        txt_out, img_out = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * layer_norm(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * layer_norm(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nnx.Module):
    """DiT block, attention and MLP in parallel, over the joint sequence x (B, L, hidden) -> same shape."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        dtype: DType = jnp.float32,
        zero_init: bool = False,
        rngs: nnx.Rngs,
    ):
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = linear(
            hidden_size, 3 * hidden_size + self.mlp_hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs
        )
        self.linear2 = linear(
            hidden_size + self.mlp_hidden, hidden_size, ("mlp", "embed"), dtype=dtype, rngs=rngs
        )
        self.norm = QKNorm(hidden_size // num_heads, rngs=rngs)
        self.modulation = Modulation(hidden_size, double=False, dtype=dtype, zero=zero_init, rngs=rngs)

    def __call__(self, x: jax.Array, vec: jax.Array, pe: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        shift, scale, gate = self.modulation(vec)
        h = self.linear1((1 + scale) * layer_norm(x) + shift)
        qkv, mlp = h[..., : 3 * self.hidden_size], h[..., 3 * self.hidden_size :]
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, key_mask)
        out = self.linear2(jnp.concatenate([attn, jax.nn.gelu(mlp, approximate=True)], axis=-1))
        return x + gate * out


class LastLayer(nnx.Module):
    """Final adaLN (shift, scale) + Linear: x (B, L, hidden), vec (B, hidden) -> (B, L, p*p*out_channels)."""

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        out_channels: int,
        *,
        dtype: DType = jnp.float32,
        zero_init: bool = False,
        rngs: nnx.Rngs,
    ):
        out = patch_size * patch_size * out_channels
        self.linear = linear(
            hidden_size, out, ("embed", "in_features"), dtype=dtype, zero=zero_init, rngs=rngs
        )
        self.adaLN_modulation = linear(
            hidden_size, 2 * hidden_size, ("embed", "mlp"), dtype=dtype, zero=zero_init, rngs=rngs
        )

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(vec)), 2, axis=-1)
        x = (1 + scale[:, None, :]) * layer_norm(x) + shift[:, None, :]
        return self.linear(x)
