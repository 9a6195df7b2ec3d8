"""Grain pipelines: sample contents, evaluation pass, Orbax resume, augmentation, sharding, bad samples."""

import logging
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crrf_jax.data import cloudprob, contract, pipeline, sen12mscr, sources, synthetic
from crrf_jax.data.tfds import build_tfds

N_SCENES, SIZE = 16, 32  # 12 train, 2 val, 2 test


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthetic.write_synthetic_dataset(root, n_scenes=N_SCENES, size=SIZE, seed=1)
    data_dir = tmp_path_factory.mktemp("tfds")
    build_tfds(root, data_dir, "exact", cloud_prob_workers=0)  # also fills the cloud-probability cache
    return root, data_dir


def _kwargs(data, source="geotiff", **overrides):
    root, data_dir = data
    kwargs = dict(
        source=source,
        root=root,
        data_dir=data_dir,
        split="train",
        batch_size=3,
        process_index=0,
        process_count=1,
        seed=7,
    )
    return {**kwargs, **overrides}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype, key
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_sources_give_the_data_contract(data):
    root, data_dir = data
    geotiff = sources.GeoTiffSource(root, "val")
    tfds_source = sources.TfdsSource(data_dir, "val")
    assert len(geotiff) == len(tfds_source) == 2
    by_id = {tfds_source[i]["id"]: tfds_source[i] for i in range(len(tfds_source))}
    for i, triplet in enumerate(geotiff.triplets):
        sample, reference = geotiff[i], sen12mscr.read_triplet(triplet)
        np.testing.assert_array_equal(sample["s2_cloudy"], reference["s2_cloudy"])
        np.testing.assert_array_equal(sample["cloud_prob"], cloudprob.load_cloud_prob(root, triplet))
        assert sample["cloud_prob"].shape == (SIZE, SIZE, 1) and sample["cloud_prob"].dtype == np.float32
        for key in ("s1", "s2", "s2_cloudy", "cloud_prob"):
            np.testing.assert_array_equal(by_id[triplet.id][key], sample[key], err_msg=key)
    rgb = sources.GeoTiffSource(root, "val", bands="rgb")[0]
    np.testing.assert_array_equal(rgb["s2"], geotiff[0]["s2"][..., list(contract.RGB)])
    assert sources.TfdsSource(data_dir, "val", bands="rgb")[0]["s2"].shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("source", ["geotiff", "tfds"])
def test_evaluation_pass_sees_every_patch_once(data, source):
    kwargs = _kwargs(data, source, batch_size=5)
    batches = list(pipeline.eval_dataset(**kwargs))
    assert len(batches) == 3  # 12 patches -> 5 + 5 + 2 and 3 masked fillers
    assert all(b["s2"].shape == (5, SIZE, SIZE, 13) for b in batches)
    ids = np.concatenate([b["id"][b["mask"]] for b in batches])
    assert sorted(ids) == [t.id for t in sen12mscr.find_triplets(data[0], "train")]
    assert not batches[-1]["mask"][2:].any() and not batches[-1]["s2"][2:].any()
    again = list(pipeline.eval_dataset(**kwargs))
    _assert_same_batches(batches, again)


def test_both_sources_give_identical_compact_batches(data):
    """Batches stay compact on the host (uint16 DN, uint8 cloud probability, float32 S1), the same from the
    TFDS shards as from the GeoTIFFs."""
    per_source = {}
    for source in ("geotiff", "tfds"):
        batches = list(pipeline.eval_dataset(**_kwargs(data, source, batch_size=5, bands="B02,B8A,B12")))
        per_source[source] = {
            str(sample_id): {key: b[key][i] for key in contract.ARRAY_KEYS}
            for b in batches
            for i, sample_id in enumerate(b["id"])
            if b["mask"][i]
        }
    assert per_source["geotiff"].keys() == per_source["tfds"].keys() and len(per_source["tfds"]) == 12
    stored = {"s1": np.float32, **contract.COMPACT_DTYPES}
    for sample_id, arrays in per_source["geotiff"].items():
        assert arrays["s2"].shape == (SIZE, SIZE, 3)
        for key, value in arrays.items():
            assert value.dtype == stored[key], key
            np.testing.assert_array_equal(
                per_source["tfds"][sample_id][key], value, err_msg=f"{sample_id} {key}"
            )


def test_compact_tfds_reads_are_tfds_own_decoding_without_copies(data):
    """decode=False reads the records in place (crrf_jax.data.tf_example): the same arrays TFDS decodes, as
    read-only views of the record; a record that is not one of ours is refused with the folder named."""
    _, data_dir = data
    source = sources.TfdsSource(data_dir, "train", decode=False)
    tfds_source = source._open()
    for index in range(len(source)):
        ours, theirs = source[index], tfds_source[index]
        assert ours["id"] == theirs["id"].decode()
        for key in contract.ARRAY_KEYS:
            assert ours[key].dtype == theirs[key].dtype and not ours[key].flags.writeable, key
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    record = tfds_source.data_source[0]
    for broken, reason in [(record[: len(record) // 2], "truncated"), (b"", "KeyError"),
                           (record.replace(b"s2/shape", b"s2/shapf"), "KeyError")]:
        with pytest.raises(contract.DataError, match=f"{data_dir}.*record 3 .*{reason}"):
            source._parse(broken, 3)


@pytest.mark.parametrize("source", ["geotiff", "tfds"])
def test_device_normalisation_equals_the_host_float32_bit_for_bit(data, source):
    """The data contract moved to the device: `contract.normalize_batch` inside jit turns a compact batch into
    exactly the float32 the host made before (read_triplet + load_cloud_prob for the GeoTIFFs, decode_example
    for the TFDS shards); so does its host form and `to_float32=True`."""
    import jax

    root, data_dir = data
    kwargs = _kwargs(data, source, batch_size=6)
    batch = next(iter(pipeline.eval_dataset(**kwargs)))
    compact = {k: batch[k] for k in contract.ARRAY_KEYS}
    device = jax.device_get(jax.jit(contract.normalize_batch)(compact))
    host = contract.normalize_batch(compact, np)
    floats = next(iter(pipeline.eval_dataset(**kwargs, to_float32=True)))
    old = (sources.GeoTiffSource(root, "train") if source == "geotiff"
           else sources.TfdsSource(data_dir, "train"))
    old_by_id = {str(old[i]["id"]): old[i] for i in range(len(old))}
    assert batch["s2"].dtype == np.uint16 and batch["cloud_prob"].dtype == np.uint8
    for i, sample_id in enumerate(batch["id"]):
        for key in contract.ARRAY_KEYS:
            expected = old_by_id[str(sample_id)][key]
            assert expected.dtype == device[key].dtype == host[key].dtype == floats[key].dtype == np.float32
            for got in (device, host, floats):
                assert np.array_equal(got[key][i], expected), f"{source} {sample_id} {key}"


def test_a_float_dn_file_makes_its_batch_float32(data, tmp_path):
    """A float DN GeoTIFF (accepted by the contract) is normalised when read; a batch mixing it with uint16
    files is float32 for that key, with the values the float32 route gives."""
    import rasterio

    root = tmp_path / "mixed"
    shutil.copytree(data[0], root)
    triplet = sen12mscr.find_triplets(root, "train")[0]
    with rasterio.open(triplet.s2_cloudy) as src:
        profile, dn = src.profile, src.read()
    with rasterio.open(triplet.s2_cloudy, "w", **{**profile, "dtype": "float32"}) as dst:
        dst.write(dn.astype(np.float32))
    kwargs = dict(source="geotiff", root=root, split="train", batch_size=12, process_index=0, process_count=1)
    batch = next(iter(pipeline.eval_dataset(**kwargs)))
    floats = next(iter(pipeline.eval_dataset(**kwargs, to_float32=True)))
    assert batch["s2_cloudy"].dtype == np.float32 and batch["s2"].dtype == np.uint16
    np.testing.assert_array_equal(batch["s2_cloudy"], floats["s2_cloudy"])


def test_worker_batches_equal_in_process_batches(data):
    """With a worker, compact batches cross processes through shared memory: the same batches."""
    kwargs = _kwargs(data, "tfds", batch_size=5)
    in_process = list(pipeline.eval_dataset(**kwargs))
    iterator = iter(pipeline.eval_dataset(**kwargs, worker_count=1))
    _assert_same_batches(in_process, list(iterator))
    iterator.close()


def test_training_batches_shuffle_repeat_and_seed(data):
    kwargs = _kwargs(data, batch_size=4, shuffle=True, num_epochs=None)
    first = _take(iter(pipeline.make_dataset(**kwargs)), 6)  # two epochs of 12
    epoch1 = np.concatenate([b["id"] for b in first[:3]])
    epoch2 = np.concatenate([b["id"] for b in first[3:]])
    assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 12
    assert list(epoch1) != list(epoch2)  # reshuffled every epoch
    assert all(b["mask"].all() for b in first)
    other_seed = _take(iter(pipeline.make_dataset(**{**kwargs, "seed": 8})), 3)
    assert list(np.concatenate([b["id"] for b in other_seed])) != list(epoch1)


@pytest.mark.parametrize("source", ["geotiff", "tfds"])
def test_read_threads_change_the_speed_not_the_batches(data, source):
    """Reading threads ahead of the consumer keep the stream's order: crops, flips and order as with one,
    and so does the default count."""
    kwargs = _kwargs(data, source, batch_size=4, shuffle=True, num_epochs=None, crop_size=16, augment=True)
    one = _take(iter(pipeline.make_dataset(**kwargs, read_threads=1)), 7)
    for threads in (3, 0, None):
        _assert_same_batches(one, _take(iter(pipeline.make_dataset(**kwargs, read_threads=threads)), 7))


def test_default_read_threads_share_the_cores_only_where_reads_release_the_gil(data):
    root, data_dir = data
    geotiff, tfds_source = sources.GeoTiffSource(root, "train"), sources.TfdsSource(data_dir, "train")
    for workers in (0, 1, 2, 8):
        assert pipeline.default_read_threads(geotiff, workers, cores=16) == 1  # rasterio holds the GIL
    rule = {(0, 2): 2, (1, 2): 2, (2, 2): 1, (3, 2): 1, (0, 1): 1, (0, 16): 4, (2, 16): 4, (8, 16): 2}
    for (workers, cores), threads in rule.items():
        assert pipeline.default_read_threads(tfds_source, workers, cores=cores) == threads, (workers, cores)
    assert 1 <= pipeline.default_read_threads(tfds_source, 0) <= pipeline.MAX_DEFAULT_READ_THREADS


def test_a_state_from_another_shuffle_is_restored_with_a_warning(data, caplog):
    """A shuffled run's state names its order; one written before `epoch_shuffle` (no name) restores, with a
    warning that the rest of that epoch follows the new order. Evaluation passes (no shuffle) do not warn."""
    kwargs = _kwargs(data, batch_size=4, shuffle=True, num_epochs=None)
    first = iter(pipeline.make_dataset(**kwargs))
    _take(first, 2)
    state = first.get_state()
    assert state["shuffle"] == pipeline.SHUFFLE_ORDER
    with caplog.at_level(logging.WARNING, logger="crrf_jax.data.pipeline"):
        iter(pipeline.make_dataset(**kwargs)).set_state(state)
        assert not caplog.records
        old = {k: v for k, v in state.items() if k != "shuffle"}
        resumed = iter(pipeline.make_dataset(**kwargs))
        resumed.set_state(old)
        assert "another shuffle" in caplog.text and "before crrf_jax's epoch_shuffle" in caplog.text
        _assert_same_batches(_take(first, 2), _take(resumed, 2))  # positions restored; this run's order
        caplog.clear()
        evaluation = iter(pipeline.eval_dataset(**_kwargs(data)))
        evaluation.set_state({k: v for k, v in evaluation.get_state().items() if k != "shuffle"})
        assert not caplog.records


def test_a_cached_pipeline_reads_each_file_once_and_gives_the_same_batches(data, tmp_path):
    """data.cache: after the first epoch the samples come from memory; the batches (crops, flips, order) are
    the uncached pipeline's, and later epochs go on when the files are gone."""
    root = tmp_path / "raw"
    shutil.copytree(data[0], root)
    kwargs = _kwargs((root, data[1]), batch_size=4, shuffle=True, num_epochs=None, crop_size=16, augment=True)
    uncached = _take(iter(pipeline.make_dataset(**kwargs)), 9)  # three epochs of 12
    cached = iter(pipeline.make_dataset(**kwargs, cache=True))
    first_epoch = _take(cached, 3)
    shutil.rmtree(root)  # nothing left to read
    _assert_same_batches(uncached, first_epoch + _take(cached, 6))
    with pytest.raises(FileNotFoundError, match=str(root)):  # without the cache the pipeline needs the files
        next(iter(pipeline.make_dataset(**kwargs)))


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_from_orbax_checkpoint(data, tmp_path, worker_count):
    kwargs = _kwargs(data, "tfds", crop_size=16, augment=True, worker_count=worker_count)
    uninterrupted = iter(pipeline.make_dataset(**kwargs))
    _take(uninterrupted, 3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(uninterrupted)))
    manager.wait_until_finished()
    expected = _take(uninterrupted, 5)  # crosses an epoch boundary (12 patches = 4 batches)

    resumed = iter(pipeline.make_dataset(**kwargs))
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same_batches(expected, _take(resumed, 5))
    fresh = _take(iter(pipeline.make_dataset(**kwargs)), 1)  # not restored: starts over, so it differs
    assert not np.array_equal(fresh[0]["id"], expected[0]["id"]) or not np.array_equal(
        fresh[0]["s2"], expected[0]["s2"]
    )
    for iterator in (uninterrupted, resumed):
        iterator.close()


def test_state_helpers_round_trip(data, tmp_path):
    kwargs = _kwargs(data, crop_size=8, augment=True)
    iterator = iter(pipeline.make_dataset(**kwargs))
    _take(iterator, 2)
    pipeline.save_iterator_state(iterator, tmp_path / "state")
    expected = _take(iterator, 2)
    resumed = pipeline.restore_iterator_state(iter(pipeline.make_dataset(**kwargs)), tmp_path / "state")
    _assert_same_batches(expected, _take(resumed, 2))
    with pytest.raises(FileNotFoundError, match="no data-iterator state"):
        pipeline.restore_iterator_state(iterator, tmp_path / "nowhere")


def _dihedral(image, turns, flip):
    return pipeline.apply_flip_rotate(image, turns, flip)


def test_augmentation_identical_across_modalities(data):
    """Every augmented sample is one crop + rotation + flip of its patch, the same for all four arrays."""
    root, _ = data
    source = sources.GeoTiffSource(root, "train", compact=True)
    originals = {t.id: source[i] for i, t in enumerate(source.triplets)}
    batch = next(iter(pipeline.make_dataset(**_kwargs(data, batch_size=8, crop_size=20, augment=True))))
    assert batch[contract.FLIP_ROTATE].shape == (8, 2)  # applied with the rest of the contract
    batch = contract.flip_rotate_batch(batch, np)
    assert batch["s2"].shape == (8, 20, 20, 13) and batch["s1"].shape == (8, 20, 20, 2)
    seen_transforms = set()
    for i, sample_id in enumerate(batch["id"]):
        original = originals[str(sample_id)]
        matches = [
            (top, left, turns, flip)
            for turns in range(4)
            for flip in (False, True)
            for top in range(SIZE - 20 + 1)
            for left in range(SIZE - 20 + 1)
            if np.array_equal(
                _dihedral(original["s2"][top : top + 20, left : left + 20], turns, flip), batch["s2"][i]
            )
        ]
        assert len(matches) == 1, f"{sample_id}: {len(matches)} transforms reproduce s2"
        top, left, turns, flip = matches[0]
        seen_transforms.add((turns, flip))
        for key in ("s1", "s2_cloudy", "cloud_prob"):
            window = original[key][top : top + 20, left : left + 20]
            np.testing.assert_array_equal(_dihedral(window, turns, flip), batch[key][i], err_msg=key)
    assert len(seen_transforms) > 1  # the augmentation does vary


def test_process_shards_are_disjoint(data):
    count = 5
    eval_ids, eval_batches, train_ids = [], set(), []
    for index in range(count):
        kwargs = _kwargs(data, batch_size=2, process_index=index, process_count=count)
        batches = list(pipeline.eval_dataset(**kwargs))
        eval_batches.add(len(batches))
        eval_ids.append({str(i) for b in batches for i in b["id"][b["mask"]]})
        train = list(pipeline.make_dataset(**{**kwargs, "batch_size": 1, "num_epochs": 1}))
        train_ids.append([str(b["id"][0]) for b in train])
    assert eval_batches == {2}  # 12 patches over 5 processes: 3 each (padded), in 2 batches of 2 everywhere
    assert sum(len(s) for s in eval_ids) == len(set().union(*eval_ids)) == 12
    assert all(len(ids) == 12 // count for ids in train_ids)  # training: equal shards, the rest left out
    assert len({i for ids in train_ids for i in ids}) == (12 // count) * count


@pytest.fixture
def damaged(data, tmp_path):
    """A copy of the raw data with one truncated S2 file and one missing cloud-probability file."""
    root = tmp_path / "damaged"
    shutil.copytree(data[0], root)
    triplets = sen12mscr.find_triplets(root, "train")
    bad_s2, no_prob = triplets[2], triplets[5]
    bad_s2.s2.write_bytes(bad_s2.s2.read_bytes()[:500])
    cloudprob.cloud_prob_path(root, no_prob).unlink()
    return root, {bad_s2.id: bad_s2.s2, no_prob.id: cloudprob.cloud_prob_path(root, no_prob)}


@pytest.mark.parametrize("worker_count", [0, 1])
def test_skip_mode_logs_and_counts_bad_samples(damaged, worker_count, caplog):
    root, bad = damaged
    kwargs = dict(source="geotiff", root=root, split="train", batch_size=4, process_index=0, process_count=1)
    iterator = iter(pipeline.eval_dataset(**kwargs, on_error="skip", worker_count=worker_count))
    with caplog.at_level(logging.WARNING, logger="crrf_jax.data.pipeline"):
        batches = list(iterator)
    ids = {str(i) for b in batches for i in b["id"][b["mask"]]}
    assert len(ids) == 10 and not ids & set(bad)
    assert iterator.bad_samples.count == iterator.bad_sample_count == 2
    assert {e.id for e in iterator.bad_samples.entries} == set(bad)
    assert {e.path for e in iterator.bad_samples.entries} == {str(p) for p in bad.values()}
    for sample_id in bad:
        assert any(sample_id in record.getMessage() for record in caplog.records)
    assert iterator.get_state()["bad_sample_count"] == 2


def test_raise_mode_names_the_file(damaged):
    root, bad = damaged
    kwargs = dict(source="geotiff", root=root, split="train", batch_size=4, process_index=0, process_count=1)
    with pytest.raises(contract.DataError) as info:
        list(pipeline.eval_dataset(**kwargs))
    assert str(info.value).startswith(tuple(str(p) for p in bad.values()))


def test_bad_arguments_are_refused(data):
    with pytest.raises(ValueError, match="on_error"):
        pipeline.make_dataset(**_kwargs(data, on_error="ignore"))
    with pytest.raises(ValueError, match="needs data_dir"):
        pipeline.make_dataset(**{**_kwargs(data, "tfds"), "data_dir": None})
    with pytest.raises(FileNotFoundError, match="python -m crrf_jax.data.tfds"):
        sources.TfdsSource(data[0], "train")
    with pytest.raises(ValueError, match="crop_size 64 exceeds"):
        next(iter(pipeline.make_dataset(**_kwargs(data, crop_size=64))))
