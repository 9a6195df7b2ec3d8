"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") with
the AlexNet trunk, in Flax NNX: the network EMRDM scores its RGB(N) benchmarks with (`lpips.LPIPS(net='alex')`
of the `lpips` PyPI package 0.1.4, which EMRDM pins; see `crrf_jax/rgb_metrics.py` for how EMRDM calls it).

    d(x0, x1) = sum over layers l of mean over pixels of  sum_c w_lc (f0_lc - f1_lc)^2,
    f_l = the AlexNet features after ReLU l (l = 1..5) divided by their channel-vector norm (+ 1e-10),

on NCHW inputs meant to be on [-1, 1] (here NHWC), optionally through the package's input scaling layer
(x - shift) / scale first. The trunk is torchvision's AlexNet `features` up to the last ReLU: conv 11x11/4
pad 2 (64) | max-pool 3/2, conv 5x5 pad 2 (192) | max-pool 3/2, conv 3x3 (384) | conv 3x3 (256) | conv 3x3
(256), each followed by a ReLU whose output is one of the five feature maps. The heads `lin0..lin4` are 1x1
convolutions without bias to one channel (the package's NetLinLayer; its dropout is off at evaluation).

Weights come only from a safetensors file the user makes (`python -m crrf_jax.tools.lpips_weights`, which reads
torchvision's AlexNet file and the `lpips` package's `weights/v0.1/alex.pth`); nothing is downloaded. The file
holds the `lpips.LPIPS(net='alex').state_dict()` names in PyTorch layout: `net.slice{s}.{i}.weight|bias` for
the five convolutions (torchvision feature indices i = 0, 3, 6, 8, 10), `lin{k}.model.1.weight`, and optionally
`scaling_layer.shift|scale` (the package's constants) and `lins.{k}.model.1.weight` (the package's second name of
each head), both checked when present. Every key and shape is checked.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

# The lpips package's ScalingLayer constants (per RGB channel).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# (slice, torchvision feature index, in channels, out channels, kernel, stride, padding, max-pool before).
ALEX_CONVS = (
    (1, 0, 3, 64, 11, 4, 2, False),
    (2, 3, 64, 192, 5, 1, 2, True),
    (3, 6, 192, 384, 3, 1, 1, True),
    (4, 8, 384, 256, 3, 1, 1, False),
    (5, 10, 256, 256, 3, 1, 1, False),
)
EPS = 1e-10
CONVERTER = "python -m crrf_jax.tools.lpips_weights"


def _max_pool(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(kernel_size=3, stride=2) on NHWC (no padding, floor)."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
    """LPIPS distance with the AlexNet trunk: `model(x0, x1)` (B, H, W, 3) -> (B,) float32.

    `scale_inputs`: apply the package's scaling layer (lpips version '0.1', the default); False skips it, as
    the package does for any other `version` value (EMRDM's evaluator passes the float 0.1, which is not the
    string '0.1', so it runs without the scaling layer). Convolutions run at full float32 precision.
    """

    def __init__(self, *, rngs: nnx.Rngs, scale_inputs: bool = True):
        self.scale_inputs = scale_inputs
        conv = {"precision": lax.Precision.HIGHEST, "rngs": rngs}
        self.convs = nnx.List([
            nnx.Conv(cin, cout, (k, k), strides=(s, s), padding=((p, p), (p, p)), **conv)
            for _, _, cin, cout, k, s, p, _ in ALEX_CONVS
        ])
        self.lins = nnx.List([
            nnx.Conv(cout, 1, (1, 1), use_bias=False, **conv) for _, _, _, cout, *_ in ALEX_CONVS
        ])

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five unit-normalised AlexNet feature maps of x (B, H, W, 3)."""
        x = jnp.asarray(x, jnp.float32)
        if self.scale_inputs:
            x = (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
        out = []
        for conv, (*_, pool) in zip(self.convs, ALEX_CONVS):
            x = jax.nn.relu(conv(_max_pool(x) if pool else x))
            norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
            out.append(x / (norm + EPS))
        return out

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS: inputs must be two (B, H, W, 3) images, got {x0.shape} and {x1.shape}")
        f0 = self.features(jnp.concatenate([x0, x1], 0))
        b = x0.shape[0]
        total = jnp.zeros((b,), jnp.float32)
        for lin, f in zip(self.lins, f0):
            diff = (f[:b] - f[b:]) ** 2
            total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
        return total


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The keys of an LPIPS-alex weights file -> their PyTorch-layout shapes (the required keys only)."""
    shapes = {}
    for s, i, cin, cout, k, *_ in ALEX_CONVS:
        shapes[f"net.slice{s}.{i}.weight"] = (cout, cin, k, k)
        shapes[f"net.slice{s}.{i}.bias"] = (cout,)
    for n, (_, _, _, cout, *_) in enumerate(ALEX_CONVS):
        shapes[f"lin{n}.model.1.weight"] = (1, cout, 1, 1)
    return shapes


def load_lpips(path: str | os.PathLike, *, scale_inputs: bool = True) -> LPIPS:
    """An `LPIPS` with every weight from the safetensors file `path` (see the module docstring)."""
    from crrf_jax.models import port

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LPIPS weights file; make one from the lpips package's weights "
                                f"with `{CONVERTER} --help`")
    reader = port.StateDictReader(port.load_safetensors(path), f"LPIPS weights file {path}")
    for key, value in (("scaling_layer.shift", SHIFT), ("scaling_layer.scale", SCALE)):
        if key in reader:
            got = reader.take(key, (1, 3, 1, 1)).reshape(3)
            if not np.allclose(got, value, rtol=0, atol=1e-6):
                raise ValueError(f"LPIPS weights {path}: key {key!r} is {got.tolist()}, expected {list(value)}")
    model = LPIPS(rngs=nnx.Rngs(0), scale_inputs=scale_inputs)  # 2.5 M parameters: cheap to initialise
    shapes = state_dict_shapes()
    for n, (conv, lin, (s, i, *_)) in enumerate(zip(model.convs, model.lins, ALEX_CONVS)):
        weight, bias, head = f"net.slice{s}.{i}.weight", f"net.slice{s}.{i}.bias", f"lin{n}.model.1.weight"
        conv.kernel.value = jnp.asarray(reader.take(weight, shapes[weight]).transpose(2, 3, 1, 0))  # OIHW -> HWIO
        conv.bias.value = jnp.asarray(reader.take(bias, shapes[bias]))
        lin.kernel.value = jnp.asarray(reader.take(head, shapes[head]).transpose(2, 3, 1, 0))
        alias = f"lins.{n}.model.1.weight"  # the package's state dict also names each head through `lins`
        if alias in reader and not np.array_equal(reader.take(alias, shapes[head]), reader.take(head)):
            raise ValueError(f"LPIPS weights file {path}: key {alias!r} differs from {head!r}")
    reader.finish()
    return model
