"""The other benchmarks through the grain pipeline: CUHK-CR1/2, Sen2_MTC_New and SEN12MS-CR-TS sources on
generated copies of their layouts give the data contract (keys, shapes, dtypes, ranges) equal to their readers'
output, no s1 without SAR, one augmentation for every date, the split counts, errors naming the file; the
R, G, B, NIR cloud score finds the synthetic clouds; the generated Sen2_MTC_New clouds move; evaluation's data
side on multi-temporal and PNG data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crrf_jax import evaluation
from crrf_jax.data import cloudprob, contract, cuhk_cr, pipeline, sen2_mtc, sen12mscr_ts, sources
from crrf_jax.data.contract import DataError
from crrf_jax.data.synthetic import synthetic_scene

SIZE = 32
RGBN = "B04,B03,B02,B08"
CUHK_COUNTS = {"train": 4, "test": 2}
TS_DATES = 5  # dates per synthetic series: 3 inputs, a target and one more


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    cuhk_cr.write_synthetic_cuhk_cr(base / "cuhk", "CR1", CUHK_COUNTS, size=2 * SIZE, seed=1)
    sen2_mtc.write_synthetic_sen2_mtc(base / "mtc", images_per_tile=2, size=SIZE, seed=2)
    sen12mscr_ts.write_synthetic_sen12mscr_ts(base / "ts", n_patches=2, n_dates=TS_DATES, size=16, seed=3)
    return {"cuhk_cr1": base / "cuhk", "sen2_mtc_new": base / "mtc", "sen12mscr_ts": base / "ts"}


def _options(dataset):
    return {"cuhk_cr1": {"downsample": 2, "bands": RGBN}, "sen2_mtc_new": {"dates": 3, "bands": RGBN},
            "sen12mscr_ts": {"dates": 3, "bands": None}}[dataset]


def _source(roots, dataset, split="train", **overrides):
    return sources.open_source("geotiff", root=roots[dataset], dataset=dataset, split=split,
                                **{**_options(dataset), **overrides})


def _batches(roots, dataset, **kwargs):
    options = {"source": "geotiff", "root": roots[dataset], "dataset": dataset, "split": "train", "batch_size": 2,
               "process_index": 0, "process_count": 1, "seed": 5, **_options(dataset), **kwargs}
    return pipeline.make_dataset(**options)


def _check_contract(sample, dataset, temporal_dates, bands, height):
    keys = {"s2", "s2_cloudy", "cloud_prob", "id"} | ({"s1"} if dataset == "sen12mscr_ts" else set())
    assert set(sample) == keys
    lead = (temporal_dates,) if temporal_dates else ()
    shapes = {"s2": (height, height, bands), "s2_cloudy": (*lead, height, height, bands),
              "cloud_prob": (*lead, height, height, 1), "s1": (*lead, height, height, 2)}
    for key in keys - {"id"}:
        assert sample[key].shape == shapes[key], key
        assert sample[key].dtype == np.float32, key
        assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0, key


# ----------------------------------------------------------------------------------- sources equal the readers


def test_cuhk_source_is_the_reader_halved_with_the_rgbn_score(roots):
    source = _source(roots, "cuhk_cr1")
    pair = cuhk_cr.find_pairs(roots["cuhk_cr1"], "CR1", "train")[1]
    sample = source[1]
    _check_contract(sample, "cuhk_cr1", 0, 4, SIZE)
    want = cuhk_cr.read_pair(pair)
    assert sample["id"] == want["id"] == "CR1/train/2"
    for key in ("s2", "s2_cloudy"):
        np.testing.assert_array_equal(sample[key], sources.downsample_bicubic(want[key], 2))
    halved = sources.downsample_bicubic(want["s2_cloudy"], 2)
    np.testing.assert_array_equal(sample["cloud_prob"],
                                  cloudprob.rgbn_cloud_score(halved, sources.CUHK_REFLECTANCE_SCALE))
    # A band subset selects the same channels (Sentinel-2 names of R, G, B, NIR); bands it lacks are refused.
    rgb = _source(roots, "cuhk_cr1", bands="rgb")[1]
    np.testing.assert_array_equal(rgb["s2"], sample["s2"][..., :3])
    with pytest.raises(ValueError, match="holds bands B04,B03,B02,B08 only, not B01"):
        _source(roots, "cuhk_cr1", bands="B01,B04")


def test_downsample_keeps_a_constant_image_and_halves_the_size():
    image = np.full((2, 8, 6, 3), 0.25, np.float32)
    out = sources.downsample_bicubic(image, 2)
    assert out.shape == (2, 4, 3, 3)
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_sen2_mtc_source_is_the_reader_with_one_cloud_map_per_date(roots):
    source = _source(roots, "sen2_mtc_new", split="val")
    for i, item in enumerate(sen2_mtc.find_samples(roots["sen2_mtc_new"], "val")):
        sample, want = source[i], sen2_mtc.read_sample(item)
        _check_contract(sample, "sen2_mtc_new", 3, 4, SIZE)
        assert sample["id"] == want["id"]
        np.testing.assert_array_equal(sample["s2"], want["s2"])
        np.testing.assert_array_equal(sample["s2_cloudy"], want["s2_cloudy"])
        np.testing.assert_array_equal(sample["cloud_prob"], cloudprob.rgbn_cloud_score(want["s2_cloudy"]))
    # Fewer dates: the least cloudy ones in date order; one date is a single-image sample.
    one, two = _source(roots, "sen2_mtc_new", split="val", dates=1), _source(roots, "sen2_mtc_new", split="val", dates=2)
    full = source[0]
    order = np.argsort(full["cloud_prob"].mean(axis=(1, 2, 3)), kind="stable")
    np.testing.assert_array_equal(one[0]["s2_cloudy"], full["s2_cloudy"][order[0]])
    np.testing.assert_array_equal(one[0]["cloud_prob"], full["cloud_prob"][order[0]])
    np.testing.assert_array_equal(two[0]["s2_cloudy"], full["s2_cloudy"][np.sort(order[:2])])
    with pytest.raises(ValueError, match="config.data.dates=4"):
        _source(roots, "sen2_mtc_new", dates=4)


def test_ts_source_is_the_readers_fixed_choice_with_s2cloudless_per_date(roots):
    source = _source(roots, "sen12mscr_ts", split="test")
    assert source.sampler == "fixed" and _source(roots, "sen12mscr_ts").sampler == "random"
    series = sen12mscr_ts.find_series(roots["sen12mscr_ts"], "test")[0]
    sample = source[0]
    _check_contract(sample, "sen12mscr_ts", 3, 13, 16)
    want = sen12mscr_ts.read_sample(series, 3, sampler="fixed")  # its own coverage, from the files
    assert sample["id"] == want["id"] == series.id
    for key in ("s1", "s2", "s2_cloudy"):
        np.testing.assert_array_equal(sample[key], want[key], err_msg=key)
    np.testing.assert_array_equal(sample["cloud_prob"], cloudprob.cloud_probability(want["s2_cloudy"]))
    assert source.reference_file(0) == series.s2[want["target_index"]]


def test_ts_random_draws_follow_the_readers_sampler_and_the_seed(roots):
    source = _source(roots, "sen12mscr_ts")
    rng = np.random.default_rng(11)
    want = sen12mscr_ts.read_sample(source.items[1], 3, sampler="random", rng=np.random.default_rng(11))
    got = source.read(1, rng)
    np.testing.assert_array_equal(got["s2_cloudy"], want["s2_cloudy"])
    np.testing.assert_array_equal(got["s2"], want["s2"])
    first = [b["s2_cloudy"] for b in _take(iter(_batches(roots, "sen12mscr_ts", crop_size=16)), 3)]
    again = [b["s2_cloudy"] for b in _take(iter(_batches(roots, "sen12mscr_ts", crop_size=16)), 3)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # Holding samples in memory would freeze each sample's first draw: refused, naming the source.
    with pytest.raises(ValueError, match="draws afresh at every read"):
        _batches(roots, "sen12mscr_ts", crop_size=16, cache=True)


def test_ts_cache_holds_the_readers_coverage_and_the_probability_maps(roots, tmp_path):
    cache = cloudprob.compute_ts_coverage(roots["sen12mscr_ts"], cache_dir=tmp_path, progress=False)
    series = sen12mscr_ts.find_series(roots["sen12mscr_ts"], "all")
    assert sorted(cache) == sorted(s.id for s in series)
    for s in series[:2]:
        assert cache[s.id] == sen12mscr_ts.cloud_coverage(s)  # exactly the reader's, from the same maps
    assert cloudprob.load_ts_coverage(tmp_path) == cache
    cached = _source(roots, "sen12mscr_ts", split="test", cloud_prob_dir=tmp_path)
    fresh = _source(roots, "sen12mscr_ts", split="test")
    a, b = cached[1], fresh[1]
    np.testing.assert_array_equal(a["s2_cloudy"], b["s2_cloudy"])
    np.testing.assert_allclose(a["cloud_prob"], b["cloud_prob"], atol=1 / 510 + 1e-6)  # uint8 cache
    cloudprob.ts_coverage_path(tmp_path).write_text("[1, 2")
    with pytest.raises(DataError, match="sen12mscr_ts_coverage.json: not a SEN12MS-CR-TS coverage cache"):
        cloudprob.load_ts_coverage(tmp_path)


def test_too_few_dates_name_the_series_file(roots):
    source = _source(roots, "sen12mscr_ts", split="test", dates=TS_DATES)
    with pytest.raises(DataError, match=r"_ImgNo_0_.*too few for 5 inputs and a target"):
        source[0]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("dataset", ["cuhk_cr1", "sen2_mtc_new"])
def test_batches_without_sar_have_no_s1(roots, dataset):
    batch = next(iter(_batches(roots, dataset, crop_size=16, augment=True)))
    assert "s1" not in batch
    lead = (3,) if dataset == "sen2_mtc_new" else ()
    assert batch["s2_cloudy"].shape == (2, *lead, 16, 16, 4) and batch["cloud_prob"].shape == (2, *lead, 16, 16, 1)
    assert batch["s2"].shape == (2, 16, 16, 4)


def test_ts_batches_carry_sar_per_date(roots):
    batch = next(iter(_batches(roots, "sen12mscr_ts", crop_size=16)))
    assert batch["s1"].shape == (2, 3, 16, 16, 2) and batch["s2_cloudy"].shape == (2, 3, 16, 16, 13)


def test_augmentation_is_one_transform_for_every_date_and_modality(roots):
    source = _source(roots, "sen2_mtc_new")
    originals = {item.id: source[i] for i, item in enumerate(source.items)}
    crop, seen = 20, set()
    for batch in _take(iter(_batches(roots, "sen2_mtc_new", batch_size=4, crop_size=crop, augment=True)), 2):
        batch = contract.flip_rotate_batch(batch, np)  # what the jitted step applies first
        for i, sample_id in enumerate(batch["id"]):
            original = originals[str(sample_id)]
            matches = [(top, left, turns, flip)
                       for turns in range(4) for flip in (False, True)
                       for top in range(SIZE - crop + 1) for left in range(SIZE - crop + 1)
                       if np.array_equal(pipeline.apply_flip_rotate(
                           original["s2"][top:top + crop, left:left + crop], turns, flip), batch["s2"][i])]
            assert len(matches) == 1, sample_id
            top, left, turns, flip = matches[0]
            seen.add((turns, flip))
            for key in ("s2_cloudy", "cloud_prob"):
                for t in range(3):
                    window = original[key][t, top:top + crop, left:left + crop]
                    np.testing.assert_array_equal(pipeline.apply_flip_rotate(window, turns, flip),
                                                  batch[key][i, t], err_msg=f"{key} date {t}")
    assert len(seen) > 1


@pytest.mark.parametrize("dataset, counts", [
    ("cuhk_cr1", {"train": 4, "test": 2}),
    ("sen2_mtc_new", {"train": 4, "val": 2, "test": 2}),
    ("sen12mscr_ts", {"train": 2, "val": 2, "test": 2}),
])
def test_split_counts_and_one_evaluation_pass(roots, dataset, counts):
    for split, n in counts.items():
        assert len(_source(roots, dataset, split=split)) == n
    split = "test"
    ids = []
    for batch in pipeline.eval_dataset(source="geotiff", root=roots[dataset], dataset=dataset, split=split,
                                       batch_size=3, process_index=0, process_count=1, **_options(dataset)):
        ids += [str(i) for i, m in zip(batch["id"], batch["mask"], strict=True) if m]
    assert sorted(ids) == sorted(item.id for item in _source(roots, dataset, split=split).items)


def test_bad_files_raise_naming_the_file(roots, tmp_path):
    cuhk_cr.write_synthetic_cuhk_cr(tmp_path / "cuhk", "CR1", {"train": 2}, size=16)
    bad_png = cuhk_cr.find_pairs(tmp_path / "cuhk", "CR1", "train")[1].nir_cloud
    bad_png.write_bytes(b"not a png")
    sen2_mtc.write_synthetic_sen2_mtc(tmp_path / "mtc", {"train": ("T09WWP_R071",)}, images_per_tile=2, size=16)
    bad_tif = sen2_mtc.find_samples(tmp_path / "mtc", "train")[1].s2_cloudy[2]
    bad_tif.write_bytes(b"II*\x00 truncated")
    for dataset, root, bad in (("cuhk_cr1", tmp_path / "cuhk", bad_png), ("sen2_mtc_new", tmp_path / "mtc", bad_tif)):
        with pytest.raises(DataError, match=str(bad)):
            list(pipeline.eval_dataset(source="geotiff", root=root, dataset=dataset, split="train", batch_size=2,
                                       process_index=0, process_count=1, **_options(dataset)))
        skipping = iter(pipeline.eval_dataset(source="geotiff", root=root, dataset=dataset, split="train",
                                              batch_size=2, process_index=0, process_count=1, on_error="skip",
                                              **_options(dataset)))
        batches = list(skipping)
        assert sum(int(b["mask"].sum()) for b in batches) == 1 and skipping.bad_sample_count == 1


def test_dataset_arguments_are_checked(roots):
    with pytest.raises(ValueError, match="config.data.dataset='sen2_mtc'"):
        sources.open_source("geotiff", root=roots["sen2_mtc_new"], dataset="sen2_mtc")
    with pytest.raises(ValueError, match="reads its raw layout"):
        sources.open_source("tfds", root=roots["sen2_mtc_new"], dataset="sen2_mtc_new")
    with pytest.raises(ValueError, match="SEN12MS-CR is single-date"):
        sources.open_source("geotiff", root=roots["sen2_mtc_new"], dates=3)


# ------------------------------------------------------------------------------------ cloud score, generators


def _auc(score, truth):
    """Area under the ROC curve: the probability that a cloudy pixel scores above a clear one (ties half)."""
    from scipy.stats import rankdata

    score, truth = np.ravel(score), np.ravel(truth).astype(bool)
    ranks = rankdata(score)
    n_pos, n_neg = truth.sum(), (~truth).sum()
    return (ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@pytest.mark.parametrize("seed", range(4))
def test_rgbn_cloud_score_finds_the_synthetic_clouds(seed):
    """On each Sen2_MTC_New-layout sample: AUC >= 0.95 and IoU at 0.5 >= 0.75 against the known cloud masks
    (thick opacity > 0.5 or thin > 0.3), and under 5 % of the clear target's pixels flagged."""
    data = sen2_mtc.synthetic_sample(SIZE, seed)
    score = cloudprob.rgbn_cloud_score(data["s2_cloudy"].astype(np.float32) / 10000)[..., 0]
    assert score.shape == (3, SIZE, SIZE) and 0 <= score.min() and score.max() <= 1
    truth = (data["thick"] > 0.5) | (data["thin"] > 0.3)
    flagged = score > 0.5
    assert _auc(score, truth) >= 0.95
    assert (flagged & truth).sum() / (flagged | truth).sum() >= 0.75
    clear = cloudprob.rgbn_cloud_score(data["s2"].astype(np.float32) / 10000)
    assert (clear > 0.5).mean() < 0.05


def test_rgbn_cloud_score_on_8_bit_cuhk_images():
    pair = cuhk_cr.synthetic_cuhk_pair(SIZE, seed=2, variant="CR2")
    scene = synthetic_scene(SIZE, seed=2, cloud_cover=0.5)  # the scene the pair was drawn from
    score = cloudprob.rgbn_cloud_score(pair["cloud"] / np.float32(255), sources.CUHK_REFLECTANCE_SCALE)
    truth = (scene["thick"] > 0.5) | (scene["thin"] > 0.3)
    assert _auc(score, truth) >= 0.95


def test_rgbn_cloud_score_rejects_bad_input():
    with pytest.raises(ValueError, match="needs \\(..., 4\\)"):
        cloudprob.rgbn_cloud_score(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        cloudprob.rgbn_cloud_score(np.full((4, 4, 4), np.nan, np.float32))


def test_generated_sen2_mtc_clouds_move_between_dates():
    for seed in range(3):
        thick = sen2_mtc.synthetic_sample(SIZE, seed)["thick"] > 0.5
        assert thick.any(axis=(1, 2)).all()
        assert thick.all(axis=0).mean() < 0.06  # few pixels are cloudy on every date
        cloudy_first = thick[0]
        assert (cloudy_first & ~thick[1:].all(axis=0)).sum() >= 0.9 * cloudy_first.sum()


def test_tiny_copies_are_quick(tmp_path):
    """8 samples of 32 x 32 in each layout, for the end-to-end tests of each config."""
    import time

    t0 = time.perf_counter()
    sen2_mtc.write_synthetic_sen2_mtc(tmp_path / "m", images_per_tile=2, size=32)  # 4 tiles x 2
    cuhk_cr.write_synthetic_cuhk_cr(tmp_path / "c", "CR2", {"train": 6, "test": 2}, size=32)
    sen12mscr_ts.write_synthetic_sen12mscr_ts(tmp_path / "t", n_patches=3, n_dates=4, size=32)  # 3 ROIs x 3
    assert time.perf_counter() - t0 < 10


# --------------------------------------------------------------------------------------- evaluation's data side


class _CopyLeastCloudy:
    """A stand-in remover: predicts the least cloudy date (checks what evaluate passes and scores)."""

    band_indices = (3, 2, 1, 7)
    band_names = ("B04", "B03", "B02", "B08")

    def __init__(self):
        self.config = {"sampling": {"steps": 1, "guidance_scale": 1.0}}
        self.seen = []

    def use_sar(self, wanted):
        return wanted

    platform = "cpu"

    def submit_tiles(self, tiles, ids, **options):
        self.seen.append({k: v.shape for k, v in tiles.items()})
        mean = evaluation.least_cloudy_date(tiles)["s2_cloudy"]
        return lambda: (mean, np.zeros_like(mean))


def test_least_cloudy_date_picks_each_images_clearest_date():
    prob = np.zeros((2, 3, 4, 4, 1), np.float32)
    prob[0, 0], prob[0, 2], prob[1, :2] = 0.9, 0.5, 0.7
    cloudy = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1, 1, 1) * np.ones((2, 3, 4, 4, 4), np.float32)
    view = evaluation.least_cloudy_date({"s2_cloudy": cloudy, "cloud_prob": prob})
    assert view["date"].tolist() == [1, 2]
    np.testing.assert_array_equal(view["s2_cloudy"][:, 0, 0, 0], [1.0, 5.0])


@pytest.mark.parametrize("dataset", ["sen2_mtc_new", "cuhk_cr1"])
def test_evaluate_reads_the_dataset_and_scores_the_temporal_reference(roots, dataset, tmp_path, caplog):
    remover = _CopyLeastCloudy()
    options = {k: v for k, v in _options(dataset).items() if k != "bands"}
    with caplog.at_level("INFO"):
        result = evaluation.evaluate(remover, root=str(roots[dataset]), out=str(tmp_path), dataset=dataset,
                                     batch_size=2, write_geotiff=True, write_examples=True, **options)
    temporal = dataset == "sen2_mtc_new"
    assert result["dataset"] == dataset and result["num_images"] == 2
    assert ("least_cloudy_composite" in result["methods"]) == temporal
    assert all("s1" not in seen for seen in remover.seen)
    assert remover.seen[0]["s2_cloudy"] == ((2, 3, SIZE, SIZE, 4) if temporal else (2, SIZE, SIZE, 4))
    # the stand-in predicts the scored cloudy input exactly
    assert result["model"]["psnr"] == pytest.approx(result["cloudy_input"]["psnr"])
    written = sorted(p.name for p in (tmp_path / "predictions").glob("*.tif"))
    if temporal:
        assert written == ["T12TUR_R027_0.tif", "T12TUR_R027_1.tif"]
        assert result["least_cloudy_composite"]["psnr"] >= result["cloudy_input"]["psnr"]
    else:
        assert written == [] and "no georeferenced files" in caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["dataset"] == dataset


# --------------------------------------------------------------------------------------------- prepare_data


def test_prepare_data_writes_the_multi_temporal_demo_data(tmp_path):
    from configs import demo_mt
    from crrf_jax import trainer

    config = demo_mt.get_config()
    config.data.synthetic_scenes, config.data.synthetic_size = 8, 32
    trainer.prepare_data(config, tmp_path)
    assert config.data.root == str(tmp_path / "data")
    counts = {split: len(_source({"sen2_mtc_new": config.data.root}, "sen2_mtc_new", split=split))
              for split in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 2}


def test_prepare_data_caches_the_ts_coverage(roots, tmp_path):
    import shutil

    from configs import sen12mscr_ts as ts_config
    from crrf_jax import trainer

    root = tmp_path / "ts"
    shutil.copytree(roots["sen12mscr_ts"], root)
    config = ts_config.get_config()
    config.data.root, config.data.worker_count = str(root), 0
    trainer.prepare_data(config, tmp_path / "run")
    cache = cloudprob.load_ts_coverage(root)
    assert len(cache) == 6 and all(len(v) == TS_DATES for v in cache.values())
    first = sen12mscr_ts.find_series(root, "train")[0]
    assert all(cloudprob.ts_cloud_prob_path(root, p).is_file() for p in first.s2)


def test_ts_training_iterator_resumes_exactly(roots):
    """The random-sampler route (indices shuffled, then read with a per-position generator) restores from
    its state: the restored iterator yields the batches the uninterrupted one does."""
    run = iter(_batches(roots, "sen12mscr_ts", crop_size=16, augment=True))
    next(run)
    state = run.get_state()
    want = _take(run, 2)
    restored = iter(_batches(roots, "sen12mscr_ts", crop_size=16, augment=True))
    restored.set_state(state)
    for a, b in zip(want, _take(restored, 2), strict=True):
        assert a["id"].tolist() == b["id"].tolist()
        for key in ("s1", "s2", "s2_cloudy", "cloud_prob"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
