"""bench/quality.py's pieces that need no trained model: the markdown table, the VAE round trip (the latent
ceiling) and its scoring, and the report sentence on it.

The round trip is checked on a random-weight demo autoencoder (shapes, range, batching and padding leave each
image's result alone) and on a lossless stand-in, whose round trip of the clear target must score perfectly
and whose round trip of the cloudy input must score exactly as the cloudy input does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crrf_jax import evaluation

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load_quality():
    sys.path.insert(0, str(BENCH))  # quality.py imports report.py beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


Q = _load_quality()


class _Config(NamedTuple):
    downsample_factor: int


class _Lossless(nnx.Module):
    """An "autoencoder" whose latent is the image: decode(encode(x)) == x."""

    def __init__(self, downsample_factor: int = 4):
        self.config = _Config(downsample_factor)
        self.offset = nnx.Param(jnp.zeros((), jnp.float32))

    def encode(self, x):
        return x + self.offset[...]

    def decode(self, z):
        return z - self.offset[...]


def _images(n=5, h=12, w=10, bands=3, seed=0):
    """Held-out-like images: a target, a brighter "cloudy" copy in a band of rows, its cloud probability."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s2 = rng.uniform(0.05, 0.9, (h, w, bands)).astype(np.float32)
        prob = np.zeros((h, w, 1), np.float32)
        if i % 2 == 0:  # every other image has cloudy pixels
            prob[2:6] = 0.9
        cloudy = np.where(prob > 0.5, np.clip(s2 + 0.3, 0, 1), s2).astype(np.float32)
        out.append({"s2": s2, "s2_cloudy": cloudy, "cloud_prob": prob, "s1": np.zeros((h, w, 2), np.float32)})
    return out


# ---- the markdown table


def test_markdown_table_rows_cells_and_delta():
    row = {"": {"psnr": 30.0, "ssim": 0.91234, "sam": 2.5},
           "_cloudy_pixels": {"psnr": 25.0, "ssim": 0.8, "sam": float("nan")},
           "_clear_pixels": {"sam": float("inf")}}
    base = {"_cloudy_pixels": {"psnr": 24.0}}
    lines = Q.markdown_table("method", [("ours", row), ("missing", None)], delta_to=base)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    width = 1 + len(Q.COLUMNS) + 1
    assert all(len(c) == width for c in cells)
    assert cells[0][0] == "method" and cells[0][-1] == "Δ PSNR cloudy"
    assert cells[1][0] == "---" and all(c == "---:" for c in cells[1][1:])
    ours = dict(zip(cells[0], cells[2]))
    assert ours["PSNR"] == "30.00" and ours["SSIM"] == "0.9123" and ours["SAM"] == "2.50"
    assert ours["SAM cloudy"] == "n/a" and ours["SAM clear"] == "inf" and ours["Δ PSNR cloudy"] == "+1.00"
    assert cells[3] == ["missing", *["n/a"] * (width - 1)]
    # Without delta_to there is no delta column.
    assert "Δ" not in Q.markdown_table("m", [("ours", row)])[0]


# ---- the VAE round trip


@pytest.fixture(scope="module")
def demo_vae():
    from configs import demo
    from crrf_jax.models import build

    return build.autoencoder(demo.get_config().model, "vae_s2")


def test_vae_roundtrip_of_a_random_demo_autoencoder(demo_vae):
    bands = demo_vae.config.in_channels
    # 12 x 20 is no multiple of the downsample factor (8); 3 images in batches of 2 pad the last batch.
    x = np.random.default_rng(0).uniform(0, 1, (3, 12, 20, bands)).astype(np.float32)
    out = Q.vae_roundtrip(demo_vae, x, batch_size=2)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    # An image's round trip does not depend on the batch it went through with.
    alone = Q.vae_roundtrip(demo_vae, x[2:], batch_size=2)
    np.testing.assert_allclose(alone[0], out[2], atol=1e-5)


def test_vae_roundtrip_pads_and_crops_back_and_clips():
    x = np.random.default_rng(1).uniform(-0.2, 1.2, (3, 10, 14, 3)).astype(np.float32)
    out = Q.vae_roundtrip(_Lossless(downsample_factor=4), x, batch_size=2)
    np.testing.assert_allclose(out, np.clip(x, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        Q.vae_roundtrip(_Lossless(), x[0])


def test_vae_roundtrip_reference_of_a_lossless_autoencoder():
    images = _images()
    result = Q.vae_roundtrip_reference(_Lossless(), iter(images), threshold=0.5, batch_size=2)
    for name in (Q.VAE_CLEAR, Q.VAE_CLOUDY):
        assert all(g in result for g in evaluation.method_groups(name))
        assert result["image_counts"][name]["psnr"] == len(images)
        assert result["image_counts"][name + "_cloudy_pixels"]["psnr"] == 3  # images 0, 2, 4
        assert result["image_counts"][name + "_clear_pixels"]["psnr"] == len(images)
    # Round-tripping the target losslessly is perfect (up to the float rounding of x * 2 - 1 and back);
    # round-tripping the cloudy input scores as the input.
    assert result[Q.VAE_CLEAR]["psnr"] > 100 and result[Q.VAE_CLEAR]["sam"] == pytest.approx(0, abs=1e-2)
    assert result[Q.VAE_CLEAR]["ssim"] == pytest.approx(1.0, abs=1e-5)
    stack = {k: np.stack([im[k] for im in images]) for k in ("s2", "s2_cloudy", "cloud_prob")}
    direct = evaluation.score_methods({"cloudy_input": stack["s2_cloudy"]}, stack["s2"], stack["cloud_prob"])
    for suffix, metric in (("", "ssim"), ("", "sam"), ("_cloudy_pixels", "psnr"), ("_cloudy_pixels", "ssim"),
                           ("_cloudy_pixels", "sam")):  # all-pixel PSNR: inf for the cloud-free inputs
        assert result[Q.VAE_CLOUDY + suffix][metric] == pytest.approx(
            float(np.nanmean(direct["cloudy_input" + suffix][metric])), rel=1e-4, abs=1e-2)
    assert result["wall_s"]["vae_roundtrip"] >= 0.0


def test_vae_roundtrip_reference_batches_images_of_different_sizes():
    images = _images(n=2, h=12, w=10) + _images(n=3, h=8, w=16, seed=1)
    result = Q.vae_roundtrip_reference(_Lossless(), iter(images), batch_size=4)
    assert result["image_counts"][Q.VAE_CLEAR]["psnr"] == 5
    with pytest.raises(ValueError, match="no held-out images"):
        Q.vae_roundtrip_reference(_Lossless(), iter([]))


# ---- merging and the report sentence


def test_add_method_merges_counts_and_times():
    result = {"model": {"psnr": 1.0}, "image_counts": {"model": {"psnr": 4}}, "wall_s": {"model": 2.0}}
    Q.add_method(result, {"x": {"psnr": 3.0}, "image_counts": {"x": {"psnr": 4}}, "wall_s": {"x": 1.0}})
    assert result["x"] == {"psnr": 3.0} and result["model"] == {"psnr": 1.0}
    assert set(result["image_counts"]) == {"model", "x"} and result["wall_s"] == {"model": 2.0, "x": 1.0}


def test_latent_ceiling_sentence():
    result = {Q.VAE_CLEAR: {"psnr": 31.234, "sam": 1.5},
              Q.VAE_CLEAR + "_cloudy_pixels": {"psnr": 29.0, "sam": 1.75},
              Q.VAE_CLOUDY: {"psnr": 20.5, "sam": 6.0}, "cloudy_input": {"psnr": 21.0, "sam": 5.5}}
    text = Q.latent_ceiling(result)
    assert "31.23 dB / 1.50 deg SAM" in text and "29.00 dB / 1.75 deg SAM" in text
    assert "20.50 dB" in text and "21.00 dB" in text and "refiner" in text
    assert Q.latent_ceiling({"model": {"psnr": 1.0}}) == ""
