"""Builds the networks of a model config (configs/common.py `model_config`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def autoencoder(model_cfg, which: str, dtype: str = "float32", seed: int = 0):
    """The Sentinel-2 (`which="vae_s2"`) or Sentinel-1 (`"vae_s1"`) autoencoder."""
    from crrf_jax.models.autoencoder import AutoEncoder, AutoEncoderConfig

    cfg = AutoEncoderConfig.from_mapping(model_cfg[which].to_dict())
    return AutoEncoder(cfg, dtype=compute_dtype(dtype), rngs=nnx.Rngs(seed))


def cloud_removal_flux(model_cfg, dtype: str = "float32", remat_policy: str = "none", seed: int = 0):
    """The rectified-flow transformer with its cloud-probability encoder."""
    from crrf_jax.models.flux import CloudRemovalFlux

    return CloudRemovalFlux(
        model_cfg.flux.to_dict(),
        model_cfg.cloud_cnn.to_dict(),
        dtype=compute_dtype(dtype),
        remat_policy=remat_policy,
        embedded_guidance=float(model_cfg.get("embedded_guidance", 1.0)),
        max_dates=int(model_cfg.get("max_dates", 1)),
        rngs=nnx.Rngs(seed),
    )


def refiner(model_cfg, dtype: str = "float32", seed: int = 0):
    """The pixel-space refiner (`model_cfg.refiner`: bands, width, dilations; it sees up to `max_dates` dates)."""
    from crrf_jax.models.refiner import Refiner, RefinerConfig

    cfg = RefinerConfig.from_mapping(model_cfg.refiner, dates=model_cfg.get("max_dates", 1))
    return Refiner(cfg, dtype=compute_dtype(dtype), rngs=nnx.Rngs(seed))
