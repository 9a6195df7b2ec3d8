"""The K ensemble samples run as extra batch rows (`samples_per_pass`) give the sequential result.

Sample k of a patch starts from the same noise whatever the pass size and the statistics are accumulated in
the same order, so the only difference allowed is the float reduction order of a bigger batch: mean and std
must agree with samples_per_pass = 1 within 2e-5 absolute (float32, reflectance in about [0, 1]). The two
patches of a batch differ, so conditioning repeated in the wrong layout (one patch's rows fed another's SAR or
cloudy latent) would show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export import STEPS, TILE, fake_run, random_scene

from crrf_jax import flow as rf
from crrf_jax import sampling
from crrf_jax.inference import CloudRemover

ATOL = 2e-5  # float32: a bigger batch may change XLA's reduction order, nothing else
CASES = [(4, 2), (4, 4), (3, 2)]  # (K, samples_per_pass); (3, 2) has a smaller last pass


@pytest.fixture(scope="module")
def remover(tmp_path_factory) -> CloudRemover:
    _, bundle = fake_run(tmp_path_factory)
    return CloudRemover.from_bundle(bundle)


def _tiles(size: int = TILE) -> dict[str, np.ndarray]:
    a, b = random_scene(size, size, seed=11), random_scene(size, size, seed=12)
    return {k: np.stack([a[k], b[k]]) for k in a}


def _close(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=ATOL, rtol=0)


def test_ensemble_sample_passes_equal_the_sequential_scan():
    """flow.ensemble_sample on a toy flow whose velocity depends on each example's own condition, both
    with per-example noise (noise_fn) and with the rng path; P larger than K is clamped to K."""
    cond = jnp.asarray([[0.5], [2.0], [-1.0]])  # (B=3, 1): one condition per example
    shape, ts = (3, 4), rf.timesteps(3, 16)
    base = jax.random.split(jax.random.key(0), 3)

    def velocity(x, t):
        c = jnp.repeat(cond, x.shape[0] // cond.shape[0], axis=0)
        return jnp.sin(c * x) + t[:, None]

    def noise(k):
        return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), shape[1:]))(base)

    def run(k, p, noise_fn):
        return rf.ensemble_sample(velocity, jax.random.key(5), shape, ts, k, decode_fn=jnp.tanh,
                                  noise_fn=noise_fn, samples_per_pass=p)

    for noise_fn in (noise, None):
        for k, p in CASES + [(3, 5), (1, 2)]:
            got = run(k, p, noise_fn)
            _close(got, run(k, 1, noise_fn))
            assert got[0].shape == got[1].shape == shape
            assert k == 1 or float(got[1].min()) > 0  # the samples do differ: std is not vacuous
    with pytest.raises(ValueError, match="samples_per_pass must be >= 1"):
        run(2, 0, noise)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sample_patches_passes_equal_the_sequential_scan(remover, guidance):
    """sample_patches with the refiner ("final") and, with guidance 2, classifier-free guidance (the
    conditional and unconditional branches double the rows of every pass)."""
    assert remover.has_refiner
    tiles = {k: jnp.asarray(v) for k, v in _tiles(32).items()}
    keys = jax.random.split(jax.random.key(3), 2)

    def run(k, p):
        return sampling.sample_patches_jit(
            remover.nets, tiles["s2_cloudy"], tiles["s1"], tiles["cloud_prob"], keys, steps=STEPS,
            num_samples=k, guidance_scale=guidance, spec=remover.spec, samples_per_pass=p)

    sequential = {k: run(k, 1) for k in (3, 4)}
    for k, p in CASES:
        _close(run(k, p), sequential[k])
    mean, std = sequential[4]
    assert float(std.min()) >= 0 and float(std.max()) > 1e-3
    assert float(jnp.abs(mean[0] - mean[1]).max()) > 1e-3  # the two patches differ


def test_predict_tiles_passes_equal_the_sequential_scan(remover):
    """Through CloudRemover.predict_tiles (mesh-sharded batch, a padded batch, partial SAR coverage)."""
    tiles = _tiles()
    coverage = np.ones((2, TILE, TILE), bool)
    coverage[1, : TILE // 2] = False  # tile 1 runs the SAR-absent mode
    tiles["s1_coverage"] = coverage
    ids = np.array([4, 9])

    def run(k, p):
        return remover.predict_tiles(tiles, ids, steps=STEPS, num_samples=k, samples_per_pass=p,
                                     pad_batch_to=3)

    sequential = {k: run(k, 1) for k in (3, 4)}
    for k, p in CASES:
        _close(run(k, p), sequential[k])
    with pytest.raises(ValueError, match="samples_per_pass must be >= 1, got 0"):
        run(2, 0)
