"""TFDS dataset `sen12mscr` (ArrayRecord shards, no TensorFlow needed). See sen12mscr_dataset_builder."""

from crrf_jax.data.tfds.sen12mscr_dataset_builder import (
    FEATURES,
    NAME,
    Sen12mscr,
    build_tfds,
    dataset_name,
    decode_example,
    encode_triplet,
)

__all__ = ["FEATURES", "NAME", "Sen12mscr", "build_tfds", "dataset_name", "decode_example", "encode_triplet"]
