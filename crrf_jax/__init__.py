"""crrf-jax: cloud removal for Sentinel-2 with a rectified-flow transformer in VAE latent space."""

__version__ = "0.1.0"
