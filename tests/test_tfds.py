"""TFDS builder: ArrayRecord shards built without TensorFlow read back exactly as the raw GeoTIFFs."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from crrf_jax.data import cloudprob, contract, sen12mscr, synthetic
from crrf_jax.data.tfds import __main__ as tfds_cli
from crrf_jax.data.tfds import build_tfds, dataset_name, decode_example


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthetic.write_synthetic_dataset(root, n_scenes=9, size=32, seed=2)  # 7 train, 1 val, 1 test
    assert not any(cloudprob.cloud_prob_path(root, t).exists() for t in sen12mscr.find_triplets(root))
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = build_tfds(root, data_dir, "exact", cloud_prob_workers=0)
    return root, data_dir, builder


def test_built_without_tensorflow(built):
    _, data_dir, builder = built
    assert "tensorflow" not in sys.modules
    files = sorted(p.name for p in (data_dir / "sen12mscr" / "exact" / "1.0.0").iterdir())
    assert any(name.startswith("sen12mscr-train.array_record-") for name in files)
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
        "train": 7,
        "val": 1,
        "test": 1,
    }


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_read_back_equals_raw_reading(built, split):
    root, data_dir, _ = built
    source = tfds.data_source(dataset_name("exact"), data_dir=data_dir, split=split)
    triplets = {t.id: t for t in sen12mscr.find_triplets(root, split)}
    assert len(source) == len(triplets)
    seen = set()
    for i in range(len(source)):
        stored = source[i]
        assert stored["s2"].dtype == np.uint16 and stored["cloud_prob"].dtype == np.uint8  # compact on disk
        sample = decode_example(stored)
        triplet = triplets[sample["id"]]
        reference = sen12mscr.read_triplet(triplet)
        for key in ("s1", "s2", "s2_cloudy"):
            assert sample[key].dtype == np.float32
            np.testing.assert_array_equal(sample[key], reference[key], err_msg=f"{triplet.id} {key}")
        np.testing.assert_array_equal(sample["cloud_prob"], cloudprob.load_cloud_prob(root, triplet))
        seen.add(sample["id"])
    assert seen == set(triplets)
    assert "tensorflow" not in sys.modules


def test_records_uncompressed_unless_asked(built, tmp_path):
    from array_record.python import array_record_module

    def writer_options(data_dir, protocol="exact"):
        shard = next((data_dir / "sen12mscr" / protocol / "1.0.0").glob("sen12mscr-train.array_record-*"))
        return array_record_module.ArrayRecordReader(
            str(shard), "readahead_buffer_size:0"
        ).writer_options_string()

    root, data_dir, _ = built
    assert "uncompressed" in writer_options(data_dir)
    build_tfds(root, tmp_path, "exact", compression="zstd")
    assert "zstd" in writer_options(tmp_path)
    zstd = tfds.data_source(dataset_name("exact"), data_dir=tmp_path, split="val")[0]
    plain = tfds.data_source(dataset_name("exact"), data_dir=data_dir, split="val")[0]
    for key in ("s1", "s2", "s2_cloudy", "cloud_prob"):
        np.testing.assert_array_equal(zstd[key], plain[key])
    with pytest.raises(ValueError, match="compression"):
        build_tfds(root, tmp_path / "x", "exact", compression="lz4")


def test_cloud_probabilities_computed_into_the_cache(built):
    root, _, _ = built
    triplets = sen12mscr.find_triplets(root)
    assert all(cloudprob.cloud_prob_path(root, t).is_file() for t in triplets)
    cloudy = np.stack([sen12mscr.read_triplet(t)["s2_cloudy"] for t in triplets[:2]])
    np.testing.assert_allclose(
        np.stack([cloudprob.load_cloud_prob(root, t) for t in triplets[:2]]),
        cloudprob.cloud_probability(cloudy),
        atol=1 / 510 + 1e-6,
    )


def test_band_selection_on_decode(built):
    _, data_dir, _ = built
    stored = tfds.data_source(dataset_name("exact"), data_dir=data_dir, split="val")[0]
    full, rgb = decode_example(stored), decode_example(stored, contract.resolve_bands("rgb"))
    np.testing.assert_array_equal(rgb["s2_cloudy"], full["s2_cloudy"][..., [3, 2, 1]])


def test_legacy_config_from_the_cli_keeps_the_leak(built, tmp_path, capsys):
    root, _, _ = built
    assert (
        tfds_cli.main(["--manual_dir", str(root), "--data_dir", str(tmp_path), "--protocol", "legacy"]) == 0
    )
    assert "sen12mscr/legacy" in capsys.readouterr().out
    train = tfds.data_source(dataset_name("legacy"), data_dir=tmp_path, split="train")
    ids = {decode_example(train[i])["id"] for i in range(len(train))}
    # Substring matching: legacy train entry spring s1_1 also claims test ROI spring s1_106.
    assert "ROIs1158_spring_106_p30" in ids and "ROIs1158_spring_1_p30" in ids


def test_readable_without_our_code(built):
    """The shards are self-describing: plain tensorflow_datasets reads them in a fresh process."""
    _, data_dir, _ = built
    code = (
        "import sys, tensorflow_datasets as tfds;"
        f"ds = tfds.data_source('sen12mscr/exact', data_dir={str(data_dir)!r}, split='test');"
        "x = ds[0]; print(len(ds), x['s2'].shape, x['s2'].dtype, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "(32,", "32,", "13)", "uint16", "False"]


def test_bad_samples_skipped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    synthetic.write_synthetic_dataset(raw, n_scenes=4, size=16, seed=0)
    broken = sen12mscr.find_triplets(raw, "train")[0]
    broken.s2_cloudy.write_bytes(b"not a tiff")
    with pytest.raises(contract.DataError, match=str(broken.s2_cloudy)):
        build_tfds(raw, tmp_path / "strict", cloud_prob_workers=0)
    builder = build_tfds(raw, tmp_path / "lenient", on_error="skip", cloud_prob_workers=0)
    assert builder.info.splits["train"].num_examples == 1  # 2 train scenes, one broken
    assert builder.bad_samples.count == 1 and {e.id for e in builder.bad_samples.entries} == {broken.id}
