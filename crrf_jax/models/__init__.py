"""Flax NNX models: the FLUX-style transformer, the VAEs and the cloud-probability CNN."""
