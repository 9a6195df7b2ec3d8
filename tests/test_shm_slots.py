"""Reused shared-memory slots for batches from grain workers: reuse, release, growth, fallback, cleanup."""

import gc
import mmap
import os

import numpy as np
import pytest
from grain.python import SharedMemoryArray

from crrf_jax.data import cloudprob, pipeline, shm_slots, synthetic

pytestmark = pytest.mark.skipif(not shm_slots.available(), reason="needs /dev/shm")


def _files(prefix: str) -> list[str]:
    return sorted(f for f in os.listdir(shm_slots.SHM_DIR) if f.startswith(prefix))


def _write(pool: shm_slots.SlotPool, arrays: dict[str, np.ndarray]) -> dict:
    slot = pool.lease([(a.shape, a.dtype) for a in arrays.values()])
    if slot is None:
        return {}
    refs = {}
    for key, value in arrays.items():
        out, refs[key] = slot.array(value.shape, value.dtype)
        out[...] = value
    return {**refs, "id": np.array(["a"])}


def _mapped_by_slot(array: np.ndarray) -> bool:
    """A view of a slot's mapping (grain's own segments are SharedMemoryArrays over theirs)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        if isinstance(array, SharedMemoryArray):
            return False
        array = array.base
    return isinstance(array.obj if isinstance(array, memoryview) else array, mmap.mmap)


def test_a_slot_is_reused_once_its_batch_is_collected():
    pool, reader = shm_slots.SlotPool(max_slots=3), shm_slots.SlotReader()
    rng = np.random.default_rng(0)
    arrays = {"s2": rng.integers(0, 10000, (2, 8, 8, 13), dtype=np.uint16),
              "s1": rng.random((2, 8, 8, 2), dtype=np.float32)}
    batch = reader.open(_write(pool, arrays))
    for key, value in arrays.items():
        np.testing.assert_array_equal(batch[key], value)
        assert batch[key].dtype == value.dtype and _mapped_by_slot(batch[key])
    assert batch["id"].tolist() == ["a"]
    first_file = pool.slots[0][0]
    assert _files(pool.prefix) == []  # the main side unlinked what it mapped: both mappings hold it now
    assert pool.flags[0] == 1

    view = batch["s1"][0]  # a view of a view keeps the slot too
    del batch
    gc.collect()
    assert pool.flags[0] == 1
    del view
    gc.collect()
    assert pool.flags[0] == 0

    again = reader.open(_write(pool, {k: v + 1 for k, v in arrays.items()}))
    assert len(pool.slots) == 1 and pool.slots[0][0] == first_file  # the same file, written again
    np.testing.assert_array_equal(again["s2"], arrays["s2"] + 1)


def test_held_batches_grow_the_pool_up_to_its_limit_then_lease_none():
    pool, reader = shm_slots.SlotPool(max_slots=2), shm_slots.SlotReader()
    held = [reader.open(_write(pool, {"x": np.full((4, 4), i, np.float32)})) for i in range(2)]
    assert len(pool.slots) == 2
    assert pool.lease([((16,), np.float32)]) is None  # both held: the caller uses grain's fresh segments
    np.testing.assert_array_equal(held[0]["x"], 0)
    np.testing.assert_array_equal(held[1]["x"], 1)
    del held[0]
    gc.collect()
    assert pool.lease([((16,), np.float32)]) is not None


def test_a_larger_batch_replaces_a_free_slot_that_is_too_small():
    pool, reader = shm_slots.SlotPool(max_slots=1), shm_slots.SlotReader()
    small = reader.open(_write(pool, {"x": np.ones((4,), np.float32)}))
    del small
    gc.collect()
    big = np.arange(4096, dtype=np.float64).reshape(64, 64)
    batch = reader.open(_write(pool, {"x": big}))
    np.testing.assert_array_equal(batch["x"], big)
    assert len(pool.slots) == 1 and len(pool.slots[0][1]) >= big.nbytes


def test_files_the_main_process_never_mapped_are_unlinked_when_the_worker_exits():
    pool = shm_slots.SlotPool(max_slots=2)
    _write(pool, {"x": np.ones((8,), np.float32)})
    assert len(_files(pool.prefix)) == 2  # the flags and the slot: nobody mapped them
    shm_slots._unlink_all(pool._made)  # what multiprocessing.util.Finalize runs at the worker's exit
    assert _files(pool.prefix) == []


def test_a_folder_that_refuses_slot_files_gives_no_pool_and_grains_path(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shm_slots, "SHM_DIR", str(tmp_path / "gone"))  # no folder: creating a file fails
    assert shm_slots.make_pool(2) is None
    assert "cannot keep shared-memory slots" in caplog.text and str(tmp_path / "gone") in caplog.text


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthetic.write_synthetic_dataset(root, n_scenes=12, size=32, seed=3)  # 8 train patches
    cloudprob.compute_cloud_probs(root, workers=0)
    return root


def test_worker_batches_through_slots_equal_in_process_batches_held_or_dropped(root):
    """Training batches (crops, flips, rotations, reshuffled epochs) from one worker equal the in-process
    ones, whether each batch is dropped at once (slots reused) or all are kept alive (the pool fills up and
    the worker falls back to grain's fresh segments); nothing of ours is left in /dev/shm afterwards."""
    kwargs = dict(source="geotiff", root=root, split="train", batch_size=2, crop_size=16, augment=True,
                  shuffle=True, seed=5, process_index=0, process_count=1, worker_buffer_size=1)
    n = 16  # 4 epochs; the pool holds at most 2 * 1 + 4 = 6 slots
    expected = [next(it) for it in [iter(pipeline.make_dataset(**kwargs))] for _ in range(n)]

    iterator = iter(pipeline.make_dataset(**kwargs, worker_count=1))
    dropped = []
    for _ in range(n):
        batch = next(iterator)
        assert _mapped_by_slot(batch["s2"])
        dropped.append({k: np.array(v) for k, v in batch.items()})
        del batch
    held = [next(iterator) for _ in range(n)]  # the same stream, four epochs on
    iterator.close()
    again = [next(it) for it in [iter(pipeline.make_dataset(**kwargs))] for _ in range(2 * n)][n:]
    for got, want in zip(dropped + held, expected + again, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert _mapped_by_slot(held[0]["s2"]) and not _mapped_by_slot(held[-1]["s2"])  # slots, then grain's
    del held, got, want
    gc.collect()
    assert _files(shm_slots.file_prefix(os.getpid())) == []
