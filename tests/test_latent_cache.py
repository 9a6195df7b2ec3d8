"""The flow stage's latent cache: encoded once, served with aligned crops and a checkpointable state."""

import logging
import threading
import time

import numpy as np
import pytest

from configs import common
from crrf_jax import latent_cache, sampling, train_lib
from crrf_jax.data import contract, pipeline
from crrf_jax.models import build


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    model = common.model_config("tiny")
    vaes = sampling.Networks.of_vaes(build.autoencoder(model, "vae_s2"), build.autoencoder(model, "vae_s1"))
    rng = np.random.default_rng(0)

    def batch(start, n, valid):
        return {
            "s2": rng.uniform(0, 1, (n, 32, 32, 13)).astype(np.float32),
            "s2_cloudy": rng.uniform(0, 1, (n, 32, 32, 13)).astype(np.float32),
            "s1": rng.uniform(0, 1, (n, 32, 32, 2)).astype(np.float32),
            # each pixel's cloud probability encodes its column, so crops can be checked for alignment
            "cloud_prob": np.broadcast_to(np.arange(32, dtype=np.float32)[None, None, :, None] / 31,
                                          (n, 32, 32, 1)).copy(),
            "id": np.array([f"p{start + i}" for i in range(n)]),
            "mask": np.array(valid),
        }

    def compact(b):  # as the pipelines give it: uint16 DN, uint8 cloud probability
        return {**b, "s2": contract.denormalize_s2(b["s2"]),
                "s2_cloudy": contract.denormalize_s2(b["s2_cloudy"]),
                "cloud_prob": contract.cloud_prob_to_uint8(b["cloud_prob"])}

    batches = [batch(0, 4, [True] * 4), compact(batch(4, 4, [True, True, False, False]))]  # last batch padded
    directory = latent_cache.build(str(tmp_path_factory.mktemp("latents")), batches, vaes)
    return directory, vaes, batches


def test_cache_holds_every_valid_sample_encoded_by_the_frozen_vaes(cache):
    directory, vaes, batches = cache
    source = latent_cache.LatentSource(directory)
    assert len(source) == 6  # padding is not cached
    assert open(f"{directory}/ids.txt").read().split() == [f"p{i}" for i in range(6)]
    expected = train_lib.encode_batch(vaes, {k: batches[0][k] for k in ("s2", "s2_cloudy", "s1")})
    for k in latent_cache.LATENT_KEYS:
        # The cache's jitted encoder against an eager one: the same values up to float reassociation.
        np.testing.assert_allclose(source[1][k], np.asarray(expected[k][1]), atol=1e-5)
        assert source[1][k].shape == (4, 4, 16)
    assert source[0]["cloud_prob"].dtype == np.uint8  # served as stored; the train step normalises it
    np.testing.assert_allclose(contract.cloud_prob_from_uint8(source[0]["cloud_prob"]),
                               batches[0]["cloud_prob"][0], atol=0.5 / 255)
    # a compact batch is normalised before encoding: its latents are those of its float32 form
    floats = contract.normalize_batch({k: batches[1][k] for k in ("s2", "s2_cloudy", "s1")}, np)
    expected = train_lib.encode_batch(vaes, floats)
    for k in latent_cache.LATENT_KEYS:
        np.testing.assert_allclose(source[5][k], np.asarray(expected[k][1]), atol=1e-5)  # jitted vs eager, as above
    np.testing.assert_array_equal(source[5]["cloud_prob"], batches[1]["cloud_prob"][1])


def test_crops_keep_latents_and_cloud_map_aligned(cache):
    directory, _, _ = cache
    it = latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=3, augment=False)
    batch = next(it)
    assert batch["x0"].shape == (2, 2, 2, 16) and batch["cloud_prob"].shape == (2, 16, 16, 1)
    source = latent_cache.LatentSource(directory)
    for i in range(2):
        # find the latent crop's position in its source sample, then check the cloud map is the same window
        matches = [(j, top, left) for j in range(len(source)) for top in range(3) for left in range(3)
                   if np.array_equal(source[j]["x0"][top:top + 2, left:left + 2], batch["x0"][i])]
        assert len(matches) == 1
        _, _, left = matches[0]
        cols = np.rint(contract.cloud_prob_from_uint8(batch["cloud_prob"][i, 0, :, 0]) * 31)
        np.testing.assert_array_equal(cols, np.arange(left * 8, left * 8 + 16))


def test_iterator_state_restores_the_same_batches(cache):
    directory, _, _ = cache
    it = latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    again = latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=1)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_iterator_state_names_its_shuffle_and_older_states_restore(cache, caplog):
    """The state names the shuffle's order like the image pipeline's; a bare grain state, which the latent
    cache wrote before, restores at its position with a warning that the order is not named."""
    directory, _, _ = cache
    it = latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state["shuffle"] == pipeline.SHUFFLE_ORDER
    expected = [next(it) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="crrf_jax.data.pipeline"):
        latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=1).set_state(state)
        assert not caplog.records
        bare = latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=1)
        bare.set_state(state["pipeline"])
        assert "none named" in caplog.text
    for want in expected:
        got = next(bare)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("read_threads", [1, 2])
def test_iterator_reads_a_few_batches_ahead_not_hundreds(cache, monkeypatch, read_threads):
    """At most READ_AHEAD_BATCHES batches (and those the threads are assembling) are read ahead of the
    consumer, however long it waits; the batches are those of any thread count. grain's default options read
    500 batches ahead (BENCHMARKS.md "Data pipeline")."""
    directory, _, _ = cache
    reads, lock, wrapped = [0], threading.Lock(), latent_cache.LatentSource.__getitem__

    def counted(self, index):
        with lock:
            reads[0] += 1
        return wrapped(self, index)

    expected = next(latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=1))
    monkeypatch.setattr(latent_cache.LatentSource, "__getitem__", counted)
    it = latent_cache.iterator(directory, batch_size=2, crop_size=16, seed=1, read_threads=read_threads)
    got = next(it)
    time.sleep(0.5)  # room to run ahead: the bound below holds whatever the threads did meanwhile
    ahead = 1 + latent_cache.READ_AHEAD_BATCHES + read_threads
    assert reads[0] <= ahead * 2, reads[0]
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_incomplete_cache_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="DONE"):
        latent_cache.LatentSource(str(tmp_path))
