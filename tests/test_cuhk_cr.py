"""CUHK-CR1/CR2 reader: generated copies read back exactly, published split sizes, every bad file named."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crrf_jax.data import cuhk_cr as cc
from crrf_jax.data.contract import DataError
from crrf_jax.data.sen12mscr import BadSampleLog

SIZE = 16


@pytest.fixture
def root(tmp_path: Path) -> Path:
    cc.write_synthetic_cuhk_cr(tmp_path, "CR1", {"train": 11, "test": 2}, size=SIZE, seed=3)
    return tmp_path


def assert_names(err: pytest.ExceptionInfo, path: Path) -> None:
    assert isinstance(err.value, DataError)
    assert err.value.path == str(path), str(err.value)
    assert str(err.value).startswith(str(path)), str(err.value)


def first_test_pair(root: Path) -> cc.CuhkPair:
    return cc.find_pairs(root, "CR1", "test")[0]


# ---------------------------------------------------------------------------------------------- read back


@pytest.mark.parametrize("variant,nir_channels", [("CR1", 3), ("CR2", 1)])
def test_generated_copy_reads_back_exactly(tmp_path, variant, nir_channels):
    ids = cc.write_synthetic_cuhk_cr(tmp_path, variant, {"train": 11, "test": 3}, size=SIZE, seed=5,
                                     nir_channels=nir_channels)
    pairs = cc.find_pairs(tmp_path, variant)
    # Order: train then test, each by byte-wise sorted file name ("10.png" before "2.png"), as EMRDM lists.
    train_names = sorted(f"{k}.png" for k in range(1, 12))
    assert [p.id for p in pairs] == [f"{variant}/train/{n[:-4]}" for n in train_names] + [
        f"{variant}/test/{k}" for k in (1, 2, 3)
    ]
    assert sorted(ids) == sorted(p.id for p in pairs)
    for pair in pairs:
        sample = cc.read_pair(pair)
        assert set(sample) == {"s2", "s2_cloudy", "id"} and sample["id"] == pair.id
        i = ids.index(pair.id)
        expected = cc.synthetic_cuhk_pair(SIZE, seed=5 * 1_000_003 + i, variant=variant)
        for key, kind in (("s2", "label"), ("s2_cloudy", "cloud")):
            assert sample[key].dtype == np.float32 and sample[key].shape == (SIZE, SIZE, 4)
            np.testing.assert_array_equal(sample[key], expected[kind].astype(np.float32) / np.float32(255))
            assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0


def test_band_order_is_rgb_then_nir_channel_zero(root):
    pair = first_test_pair(root)
    # Overwrite the NIR cloud image with distinct channels: the reader must keep channel 0 (as EMRDM).
    nir = np.stack([np.full((SIZE, SIZE), v, np.uint8) for v in (200, 7, 9)], axis=-1)
    Image.fromarray(nir).save(pair.nir_cloud)
    sample = cc.read_pair(pair)
    rgb = np.asarray(Image.open(pair.label)).astype(np.float32) / 255
    np.testing.assert_array_equal(sample["s2"][..., :3], rgb)
    np.testing.assert_array_equal(sample["s2_cloudy"][..., 3], np.float32(200) / np.float32(255))
    nir_only = cc.read_pair(pair, bands=["nir", "R"])["s2_cloudy"]
    np.testing.assert_array_equal(nir_only[..., 0], sample["s2_cloudy"][..., 3])
    np.testing.assert_array_equal(nir_only[..., 1], sample["s2_cloudy"][..., 0])
    assert cc.read_pair(pair, bands="rgb")["s2"].shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="unknown CUHK-CR band"):
        cc.resolve_cuhk_bands(["B04"])
    with pytest.raises(ValueError, match="twice"):
        cc.resolve_cuhk_bands("R,r")


def test_synthetic_cr2_is_cloudier_than_cr1(tmp_path):
    def cloud_excess(variant):
        pairs = [cc.synthetic_cuhk_pair(32, seed=s, variant=variant) for s in range(4)]
        return np.mean([(p["cloud"].astype(float) - p["label"]).mean() for p in pairs])

    assert cloud_excess("CR2") > cloud_excess("CR1") + 10


# ------------------------------------------------------------------------------------------------- splits


def test_published_split_sizes_on_full_generated_copies(tmp_path):
    for variant in cc.VARIANTS:
        cc.write_synthetic_cuhk_cr(tmp_path, variant, cc.SPLIT_COUNTS[variant], size=8)
    assert cc.SPLIT_COUNTS == {"CR1": {"train": 534, "test": 134}, "CR2": {"train": 448, "test": 111}}
    for variant in cc.VARIANTS:
        everything = cc.find_pairs(tmp_path, variant)
        assert cc.split_counts(everything) == cc.SPLIT_COUNTS[variant]
        for split in ("train", "test"):
            chosen = cc.find_pairs(tmp_path, variant, split)
            assert len(chosen) == cc.SPLIT_COUNTS[variant][split]
            assert {p.split for p in chosen} == {split}
            assert [p.name for p in chosen] == sorted(p.name for p in chosen)
        assert [p.split for p in everything] == ["train"] * cc.SPLIT_COUNTS[variant]["train"] + [
            "test"
        ] * cc.SPLIT_COUNTS[variant]["test"]


def test_variants_and_nir_root_are_separate_trees(tmp_path):
    rgb_root, nir_root = tmp_path / "rgb", tmp_path / "elsewhere"
    cc.write_synthetic_cuhk_cr(rgb_root, "CR2", {"test": 2}, size=8)
    (rgb_root / "nir").rename(nir_root)
    with pytest.raises(FileNotFoundError, match=str(rgb_root / "nir" / "CUHK-CR2")):
        cc.find_pairs(rgb_root, "CR2")
    pairs = cc.find_pairs(rgb_root, "CR2", nir_root=nir_root)
    assert [p.id for p in pairs] == ["CR2/test/1", "CR2/test/2"]
    assert pairs[0].nir_label == nir_root / "CUHK-CR2" / "test" / "label" / "1.png"
    assert cc.read_pair(pairs[0])["s2"].shape == (8, 8, 4)
    with pytest.raises(FileNotFoundError, match="CUHK-CR1"):
        cc.find_pairs(rgb_root, "CR1", nir_root=nir_root)
    with pytest.raises(FileNotFoundError, match=str(rgb_root / "CUHK-CR2" / "train" / "label")):
        cc.find_pairs(rgb_root, "CR2", "train", nir_root=nir_root)
    with pytest.raises(ValueError, match="variant must be one of"):
        cc.find_pairs(rgb_root, "CR3")
    with pytest.raises(ValueError, match="split must be one of"):
        cc.find_pairs(rgb_root, "CR2", "val", nir_root=nir_root)


def test_empty_split_and_stray_files(root):
    (root / "CUHK-CR1" / "test" / "label" / "notes.txt").write_text("not an image")
    assert len(cc.find_pairs(root, "CR1", "test")) == 2
    for folder in ("CUHK-CR1", "nir/CUHK-CR1"):
        for kind in ("label", "cloud"):
            for f in (root / folder / "test" / kind).glob("*.png"):
                f.unlink()
    with pytest.raises(ValueError, match="no CUHK-CR1 sample"):
        cc.find_pairs(root, "CR1", "test")


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("role", ["label", "cloud", "nir_label", "nir_cloud"])
def test_missing_partner_names_the_file(root, role):
    pair = first_test_pair(root)
    getattr(pair, role).unlink()
    with pytest.raises(DataError, match="missing partner") as err:
        cc.find_pairs(root, "CR1", "test")
    assert_names(err, getattr(pair, role))
    log = BadSampleLog()
    kept = cc.find_pairs(root, "CR1", "test", on_error="skip", bad_samples=log)
    assert [p.id for p in kept] == ["CR1/test/2"]
    assert log.count == 1 and log.entries[0].path == str(getattr(pair, role))
    # Deleted after listing: reading names it too.
    with pytest.raises(DataError, match="does not exist") as err:
        cc.read_pair(pair)
    assert_names(err, getattr(pair, role))


def test_orphan_cloudy_file_names_its_missing_label(root):
    orphan = root / "CUHK-CR1" / "test" / "cloud" / "99.png"
    orphan.write_bytes((root / "CUHK-CR1" / "test" / "cloud" / "1.png").read_bytes())
    with pytest.raises(DataError) as err:
        cc.find_pairs(root, "CR1", "test")
    assert_names(err, root / "CUHK-CR1" / "test" / "label" / "99.png")
    assert str(orphan) in str(err.value)


def bad_image(kind: str) -> np.ndarray:
    shapes = {"grey": (SIZE, SIZE), "rgba": (SIZE, SIZE, 4), "grey_alpha": (SIZE, SIZE, 2)}
    return np.full(shapes[kind], 100, np.uint8)


@pytest.mark.parametrize(
    "role,image,match",
    [
        ("label", "grey", r"must have 3 channels, found 1 \(grey\)"),
        ("cloud", "rgba", r"must have 3 channels, found 4 \(RGBA\)"),
        ("nir_label", "rgba", r"must have 1 or 3 channels, found 4 \(RGBA\)"),
        ("nir_cloud", "grey_alpha", r"must have 1 or 3 channels, found 2"),
    ],
)
def test_wrong_channel_count_names_the_file(root, role, image, match):
    pair = first_test_pair(root)
    Image.fromarray(bad_image(image)).save(getattr(pair, role))
    with pytest.raises(DataError, match=match) as err:
        cc.read_pair(pair)
    assert_names(err, getattr(pair, role))


def test_palette_and_16_bit_pngs_are_refused(root):
    pair = first_test_pair(root)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).convert("P").save(pair.cloud)
    with pytest.raises(DataError, match="palette") as err:
        cc.read_pair(pair)
    assert_names(err, pair.cloud)
    Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(pair.nir_label)
    with pytest.raises(DataError, match="8-bit PNG, found 16-bit") as err:
        cc.read_pair(pair)
    assert_names(err, pair.nir_label)


@pytest.mark.parametrize("role", ["cloud", "nir_label", "nir_cloud"])
def test_size_mismatch_names_the_file_and_the_label(root, role):
    pair = first_test_pair(root)
    channels = 3 if role == "cloud" else 1
    Image.fromarray(np.zeros((SIZE, SIZE + 2, channels), np.uint8).squeeze()).save(getattr(pair, role))
    with pytest.raises(DataError, match=f"size {SIZE}x{SIZE + 2} differs") as err:
        cc.read_pair(pair)
    assert_names(err, getattr(pair, role))
    assert str(pair.label) in str(err.value)


@pytest.mark.parametrize("role", ["label", "nir_cloud"])
def test_unreadable_files_name_the_file(root, role):
    pair = first_test_pair(root)
    path = getattr(pair, role)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        cc.read_pair(pair)
    assert_names(err, path)
    path.write_bytes(b"GIF89a not a png at all, long enough to have a header")
    with pytest.raises(DataError, match="not a PNG") as err:
        cc.read_pair(pair)
    assert_names(err, path)
    log = BadSampleLog()
    assert cc.read_pair_or_none(pair, on_error="skip", bad_samples=log) is None
    assert log.entries[0].path == str(path)


def test_generator_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="counts"):
        cc.write_synthetic_cuhk_cr(tmp_path, counts={"val": 2})
    with pytest.raises(ValueError, match="nir_channels"):
        cc.write_synthetic_cuhk_cr(tmp_path, nir_channels=2)
