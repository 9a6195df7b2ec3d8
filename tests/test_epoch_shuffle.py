"""epoch_shuffle.EpochShuffle: each epoch a uniform permutation of its own; access, threads, pickling."""

import collections
import pickle
import threading

import grain
import numpy as np
import pytest

from crrf_jax.data.epoch_shuffle import EpochShuffle


def _stream(n: int, seed: int, epochs: int) -> list[int]:
    ds = EpochShuffle(grain.MapDataset.range(n), seed).repeat(epochs)
    return [ds[i] for i in range(len(ds))]


def test_every_epoch_visits_every_element_once_in_its_own_order():
    n, epochs = 37, 6
    stream = np.reshape(_stream(n, seed=4, epochs=epochs), (epochs, n))
    for epoch in stream:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(epoch) for epoch in stream}) == epochs
    assert _stream(n, seed=4, epochs=epochs) == stream.ravel().tolist()  # a function of the seed
    assert _stream(n, seed=5, epochs=1) != stream[0].tolist()


def test_orders_are_uniform():
    """Over 3000 epochs of 3 elements each of the 6 orders comes up about 500 times (a binomial's standard
    deviation is 20), and each element leads in about a third of them."""
    stream = np.reshape(_stream(3, seed=0, epochs=3000), (3000, 3))
    counts = collections.Counter(map(tuple, stream))
    assert len(counts) == 6 and all(400 < c < 600 for c in counts.values()), counts
    firsts = np.bincount(stream[:, 0], minlength=3)
    assert all(880 < c < 1120 for c in firsts), firsts


def test_random_access_and_pickled_copies_give_the_stream():
    n, epochs = 20, 4
    ds = EpochShuffle(grain.MapDataset.range(n), seed=9).repeat(epochs)
    expected = _stream(n, seed=9, epochs=epochs)
    backwards = [ds[i] for i in reversed(range(n * epochs))]
    assert backwards[::-1] == expected
    copy = pickle.loads(pickle.dumps(ds))
    assert [copy[i] for i in range(n * epochs)] == expected


def test_it_passes_the_epoch_on_to_its_parent():
    """Like grain's shuffle: element i of epoch e is parent element perm[i] + e n (sources take it mod n)."""
    class Recorder(grain.MapDataset):
        def __len__(self):
            return 5

        def __getitem__(self, index):
            return index

    ds = EpochShuffle(Recorder(), seed=1)
    assert sorted(ds[i] for i in range(5, 10)) == list(range(5, 10))


def test_concurrent_readers_across_epoch_boundaries_agree():
    n, epochs = 16, 12
    ds = EpochShuffle(grain.MapDataset.range(n), seed=2).repeat(epochs)
    expected = _stream(n, seed=2, epochs=epochs)
    out = [None] * len(ds)

    def read(offset):
        for i in range(offset, len(ds), 4):
            out[i] = ds[i]

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == expected


def test_seed_out_of_range_is_refused():
    with pytest.raises(ValueError, match="seed"):
        EpochShuffle(grain.MapDataset.range(3), seed=-1)
