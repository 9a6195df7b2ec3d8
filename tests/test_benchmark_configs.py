"""Each benchmark's config end to end on a generated copy of its layout: `train.py --config=configs/<x>.py`
trains every stage, `eval.py` scores the test split the way that benchmark is scored, the run exports to a
bundle and the predict CLI removes clouds from GeoTIFFs of a test sample (several dates where the benchmark
has them, SAR where it has it).

The tiny model, 32x32 images and a few steps a stage: what is checked is that every stage of every config
runs on its dataset's batches (bands, dates, SAR or none) and that the outputs have the benchmark's shape,
not that anything is learned (tests/test_train.py does that for SEN12MS-CR). The SEN12MS-CR-TS run also has
FLUX.1-dev's layout at tiny widths (the guidance embedder, a 768-wide conditioning vector): that layout
trains, evaluates, exports and predicts with SAR context tokens and several dates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from crrf_jax import export, predict
from crrf_jax.data import contract, cuhk_cr, sen2_mtc, sen12mscr_ts, sources
from tests.helpers import train_run as tr

SIZE = 32
STEPS = {"vae_s2": 3, "vae_s1": 2, "flow": 3, "refiner": 2}
# config -> (dataset, how its synthetic copy is written, the metric set its papers score with)
BENCHMARKS = {
    "cuhk_cr1": ("cuhk_cr1", lambda root: cuhk_cr.write_synthetic_cuhk_cr(root, "CR1", {"train": 4, "test": 2},
                                                                           size=2 * SIZE), "rgb255"),
    "cuhk_cr2": ("cuhk_cr2", lambda root: cuhk_cr.write_synthetic_cuhk_cr(root, "CR2", {"train": 4, "test": 2},
                                                                           size=2 * SIZE), "rgb255"),
    "sen2_mtc_new": ("sen2_mtc_new", lambda root: sen2_mtc.write_synthetic_sen2_mtc(root, size=SIZE), "sen2mtc"),
    "sen12mscr_ts": ("sen12mscr_ts", lambda root: sen12mscr_ts.write_synthetic_sen12mscr_ts(
        root, n_patches=2, n_dates=5, size=SIZE), "sen12mscr"),
}


# FLUX.1-dev's flags at tiny widths, on the run of the config named.
FLUX_SHAPED = {"sen12mscr_ts": ["--config.model.flux.guidance_embed=True", "--config.model.flux.vec_in_dim=768",
                                "--config.model.cloud_cnn.out_dim=768", "--config.model.embedded_guidance=3.5"]}


def _flags(config: str, root: Path, workdir: Path) -> list[str]:
    # Previews (which compile the sampler once more per stage) only where their panels differ: several dates.
    previews = config == "sen2_mtc_new"
    flags = [f"--config=configs/{config}.py:variant=tiny", f"--workdir={workdir}", f"--config.data.root={root}",
             f"--config.data.crop_size={SIZE}", "--config.data.worker_count=0",
             "--config.latent_stats.batches=1", "--config.latent_stats.batch_size=2", "--config.flow.sample_steps=1",
             "--config.refiner.flow_steps=1", *FLUX_SHAPED.get(config, [])]
    for stage, steps in STEPS.items():
        flags += [f"--config.{stage}.steps={steps}", f"--config.{stage}.batch_size=2",
                  f"--config.{stage}.warmup_steps=1", f"--config.{stage}.log_every=1",
                  f"--config.{stage}.preview_every={steps if previews else 0}",
                  f"--config.{stage}.checkpoint_every={steps}"]
    return flags


def _geotiff(path: Path, bands_last: np.ndarray, descriptions=()) -> str:
    data = np.moveaxis(bands_last, -1, 0)
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=len(data),
                       dtype=data.dtype, crs="EPSG:32632", transform=from_origin(500000, 4200000, 10, 10)) as ds:
        ds.write(data)
        for i, name in enumerate(descriptions):
            ds.set_band_description(i + 1, name)
    return str(path)


def _scene_files(dataset: str, root: Path, band_names, tmp: Path) -> tuple[list[str], list[str]]:
    """A test sample of `dataset` as the GeoTIFFs a user would have: (--s2 files, --s1 files), a date each."""
    sample = sources.open_source("geotiff", root=root, split="test", bands=list(band_names),
                                  **sources.dataset_options({"dataset": dataset, "dates": 3 if dataset in
                                                              ("sen2_mtc_new", "sen12mscr_ts") else 1,
                                                              "downsample": 2 if dataset.startswith("cuhk") else 1}))[0]
    cloudy = sample["s2_cloudy"] if sample["s2_cloudy"].ndim == 4 else sample["s2_cloudy"][None]
    s2 = [_geotiff(tmp / f"s2_{d}.tif", contract.denormalize_s2(x), band_names) for d, x in enumerate(cloudy)]
    s1 = []
    if "s1" in sample:  # back to dB, as a user's SAR file holds it
        db = sample["s1"] * (contract.S1_DB_MAX - contract.S1_DB_MIN) + contract.S1_DB_MIN
        s1 = [_geotiff(tmp / f"s1_{d}.tif", x.astype(np.float32), ("VV", "VH")) for d, x in enumerate(db)]
    return s2, s1


def test_cuhk_cr1_runs_the_cuhk_cr2_path():
    """CUHK-CR1 and CUHK-CR2 share one reader, one model shape and one scorer; their configs differ in the
    dataset alone, so the end-to-end run below covers CUHK-CR1's path too (its data: test_datasets_pipeline)."""
    from configs import cuhk_cr1, cuhk_cr2

    one, two = cuhk_cr1.get_config("variant=tiny").to_dict(), cuhk_cr2.get_config("variant=tiny").to_dict()
    assert (one["data"].pop("dataset"), two["data"].pop("dataset")) == ("cuhk_cr1", "cuhk_cr2")
    assert one == two


@pytest.mark.parametrize("config", [c for c in BENCHMARKS if c != "cuhk_cr1"])
def test_config_trains_evaluates_exports_and_predicts(config, tmp_path_factory):
    dataset, write, metric_set = BENCHMARKS[config]
    root, workdir = tmp_path_factory.mktemp(f"{config}_data"), tmp_path_factory.mktemp(config)
    write(root)
    env = tr.test_env()
    out = tr.run_train(_flags(config, root, workdir), env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run_config = json.loads((workdir / "config.json").read_text())
    has_sar, dates = run_config["data"]["has_sar"], run_config["data"]["dates"]
    for stage in ("vae_s2", *(["vae_s1"] if has_sar else []), "flow", "refiner"):
        assert (workdir / stage / "final" / "DONE").read_text().strip() == str(STEPS[stage])
        assert np.all(np.isfinite(tr.losses(workdir / stage / "metrics.jsonl"))), stage
    flux_shaped = config in FLUX_SHAPED
    assert run_config["model"]["flux"]["guidance_embed"] == flux_shaped
    assert (workdir / "vae_s1").exists() == has_sar

    bundle = export.export_bundle(workdir, workdir / "bundle")
    # eval.py from the run, or (one config) from its bundle alone: the dataset and its dates come from the bundle.
    model = ([f"--bundle={bundle}", f"--data_root={root}"] if config == "sen2_mtc_new"
             else [f"--workdir={workdir}"])
    ev = subprocess.run([sys.executable, "eval.py", *model, f"--out={workdir / 'eval'}", f"--metric_set={metric_set}",
                         "--max_images=2", "--batch_size=2", "--samples=1"],
                        cwd=tr.ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert ev.returncode == 0, ev.stderr[-4000:]
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert metrics["dataset"] == dataset and metrics["num_images"] == 2 and metrics["metric_set"] == metric_set
    assert np.isfinite(metrics["model"]["psnr"])
    if dates > 1:  # the temporal reference beside the single-image ones
        assert "least_cloudy_composite" in metrics["methods"]
    if metric_set != "sen12mscr":
        assert any(k.endswith(("_255", "_mtc")) for k in metrics["model"])

    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["model"]["max_dates"] == dates and cfg["dataset"] == dataset
    assert cfg["model"]["flux"]["guidance_embed"] == flux_shaped
    assert cfg["model"]["embedded_guidance"] == (3.5 if flux_shaped else run_config["model"]["embedded_guidance"])
    assert (bundle / "vae_s1.safetensors").exists() == has_sar
    s2, s1 = _scene_files(dataset, root, cfg["bands"]["names"], tmp_path_factory.mktemp(f"{config}_scene"))
    assert len(s2) == dates
    clear = workdir / "clear.tif"
    # One tile, in a batch of 2 like eval.py's above: the same sampling program, read from the cache.
    args = [f"--bundle={bundle}", *(f"--s2={p}" for p in s2), *(f"--s1={p}" for p in s1), f"--out={clear}",
            "--steps=1", f"--tile={SIZE}", "--overlap=0", "--batch-size=2", "--quiet"]
    assert predict.main(args) == 0
    with rasterio.open(clear) as ds:
        assert ds.count == len(cfg["bands"]["names"]) and (ds.height, ds.width) == (SIZE, SIZE)
        assert ds.tags()["dates"] == str(dates) and ds.tags()["use_sar"] == str(has_sar)
