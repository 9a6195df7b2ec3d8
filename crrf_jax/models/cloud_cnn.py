"""CloudProbEncoder: the cloud-probability map -> the conditioning vector y of the transformer."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from crrf_jax.data import contract
from crrf_jax.models.layers import DType, default_kernel_init, linear, zeros_init
from crrf_jax.parallel import with_axes


class CloudProbEncoder(nnx.Module):
    """Strided 3x3 convolutions (stride 2, swish) with `channels` outputs, mean pool, Linear to `out_dim`.

    cloud_prob (B, H, W, 1) in [0, 1] -> y (B, out_dim) float32. The map is shifted to [-1, 1] first.
    """

    def __init__(self, channels: Sequence[int], out_dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        if not channels:
            raise ValueError("CloudProbEncoder needs at least one conv layer (channels is empty)")
        widths = (1, *(int(c) for c in channels))
        self.convs = nnx.List(
            [
                nnx.Conv(
                    c_in,
                    c_out,
                    (3, 3),
                    strides=2,
                    padding="SAME",
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=with_axes(default_kernel_init, "kernel_h", "kernel_w", "conv_in", "conv_out"),
                    bias_init=with_axes(zeros_init, "conv_out"),
                    rngs=rngs,
                )
                for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.out = linear(widths[-1], out_dim, ("in_features", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, cloud_prob: jax.Array) -> jax.Array:
        if cloud_prob.ndim != 4 or cloud_prob.shape[-1] != 1:
            raise ValueError(f"cloud_prob must be (B, H, W, 1), got {cloud_prob.shape}")
        x = contract.to_model(cloud_prob.astype(jnp.float32))
        for conv in self.convs:
            x = jax.nn.swish(conv(x))
        return self.out(jnp.mean(x.astype(jnp.float32), axis=(1, 2))).astype(jnp.float32)
