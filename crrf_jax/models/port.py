"""Weight import from BFL (black-forest-labs/flux) and diffusers state dicts.

A state dict maps parameter names to NumPy arrays (PyTorch layout: Linear weights are (out, in), conv weights
(out, in, kh, kw)). Each importer builds our NNX module from its config, then fills every parameter from the
state dict; a missing, unexpected or mis-shaped key is an error that names the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into {name: float32 NumPy array}; bfloat16 and float16 tensors are upcast."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    out: dict[str, np.ndarray] = {}
    try:
        # The flax (NumPy) frontend of safetensors reads bfloat16 through ml_dtypes.
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                out[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return out


class StateDictReader:
    """Hands out state-dict entries by name and reports missing, mis-shaped and unused keys."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str):
        self._sd = {k: np.asarray(v) for k, v in state_dict.items()}
        self._used: set[str] = set()
        self._source = source

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The array under `key` (as float32), checked against `shape` when given."""
        if key not in self._sd:
            raise KeyError(f"{self._source} state dict: missing key {key!r}")
        value = self._sd[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{self._source} state dict: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        self._used.add(key)
        return value.astype(np.float32)

    def finish(self) -> None:
        """Raises if any key of the state dict was never taken."""
        unused = sorted(set(self._sd) - self._used)
        if unused:
            more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
            raise ValueError(f"{self._source} state dict: unexpected keys {unused[:5]}{more}")


# --------------------------------------------------------------------------------------------------------------
# FLUX transformer (BFL and diffusers key formats)
# --------------------------------------------------------------------------------------------------------------

# (filled in with flux_from_bfl and flux_from_diffusers)


# --------------------------------------------------------------------------------------------------------------
# FLUX autoencoder (BFL and diffusers key formats)
# --------------------------------------------------------------------------------------------------------------

# (filled in with autoencoder_from_bfl and autoencoder_from_diffusers)
