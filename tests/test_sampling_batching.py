"""The K ensemble samples run as extra batch rows (`samples_per_pass`) give the sequential result.

Sample k of a patch starts from the same noise whatever the pass size and the statistics are accumulated in
the same order, so the only difference allowed is the float reduction order of a bigger batch: mean and std
must agree with samples_per_pass = 1 within 2e-5 absolute (float32, reflectance in about [0, 1]). The two
patches of a batch differ, so conditioning repeated in the wrong layout (one patch's rows fed another's SAR or
cloudy latent) would show.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export import STEPS, TILE, fake_run, random_scene

from crrf_jax import flow as rf
from crrf_jax import parallel, sampling
from crrf_jax.inference import SAR_COVERAGE, CloudRemover

ATOL = 2e-5  # float32: a bigger batch may change XLA's reduction order, nothing else
CASES = [(4, 2), (4, 4), (3, 2)]  # (K, samples_per_pass); (3, 2) has a smaller last pass


@pytest.fixture(scope="module")
def remover(tmp_path_factory) -> CloudRemover:
    _, bundle = fake_run(tmp_path_factory)
    return CloudRemover.from_bundle(bundle)


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

    @functools.partial(jax.jit, static_argnums=(0, 1, 2))
    def run(k, p, noise_fn):
        return rf.ensemble_sample(velocity, jax.random.key(5), shape, ts, k, decode_fn=jnp.tanh,
                                  noise_fn=noise_fn, samples_per_pass=p)

    for noise_fn, cases in ((noise, [*CASES, (3, 5)]), (None, [(3, 2)])):
        for k, p in cases:
            got = run(k, p, noise_fn)
            _close(got, run(k, 1, noise_fn))
            assert got[0].shape == got[1].shape == shape
            assert float(got[1].min()) > 0  # the samples do differ: std is not vacuous
    with pytest.raises(ValueError, match="samples_per_pass must be >= 1"):
        run(2, 0, noise)


def _mesh_inputs(remover: CloudRemover, tiles: dict[str, np.ndarray], ids: np.ndarray) -> dict:
    """The arguments predict_tiles gives sample_patches_jit (mesh-sharded, the same keys and SAR-absent
    flags), so the direct calls below and predict_tiles share compiled programs."""
    def put(a):
        return parallel.put_global(a, parallel.batch_sharding(remover.mesh, a.ndim))

    args = {k: put(np.asarray(tiles[k], np.float32)) for k in ("s2_cloudy", "s1", "cloud_prob")}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(put(ids.astype(np.uint32)))
    covered = tiles["s1_coverage"].reshape(len(ids), -1).mean(axis=1) >= SAR_COVERAGE
    return args | {"keys": keys, "drop_sar": put(~covered)}


@pytest.mark.parametrize("guidance,k,passes", [(2.0, 3, (2,))])  # CFG, the refiner and a short last pass
def test_sample_patches_and_predict_tiles_passes_equal_the_sequential_scan(remover, guidance, k, passes):
    """sample_patches (the refiner's "final" output; with guidance 2, classifier-free guidance doubles the
    rows of every pass) and CloudRemover.predict_tiles (mesh-sharded, one tile in the SAR-absent mode): each
    pass size gives the sequential result. K = 3 with P = 2 has a smaller last pass."""
    assert remover.has_refiner and remover.num_devices == 1  # one CPU device: no batch padding below
    tiles = {k_: np.stack([random_scene(TILE, TILE, seed=s)[k_] for s in (11, 12)])
             for k_ in ("s2_cloudy", "s1", "cloud_prob")}
    tiles["s1_coverage"] = np.ones((2, TILE, TILE), bool)
    tiles["s1_coverage"][1, : TILE // 2] = False
    ids = np.array([4, 9])
    args = _mesh_inputs(remover, tiles, ids)

    def direct(p):
        return sampling.sample_patches_jit(
            remover.nets, args["s2_cloudy"], args["s1"], args["cloud_prob"], args["keys"], steps=STEPS,
            num_samples=k, guidance_scale=guidance, spec=remover.spec, output="final", drop_cloudy=False,
            drop_sar=args["drop_sar"], samples_per_pass=p)

    sequential = direct(1)
    mean, std = (np.asarray(a) for a in sequential)
    assert std.max() > 1e-3 and np.abs(mean[0] - mean[1]).max() > 1e-3  # samples and patches do differ
    for p in passes:
        _close(direct(p), sequential)
        got = remover.predict_tiles(tiles, ids, steps=STEPS, num_samples=k, guidance_scale=guidance,
                                    samples_per_pass=p)
        _close(got, (np.clip(mean, 0, 1), std))
    with pytest.raises(ValueError, match="samples_per_pass must be >= 1, got 0"):
        remover.predict_tiles(tiles, ids, steps=STEPS, num_samples=k, samples_per_pass=0)
