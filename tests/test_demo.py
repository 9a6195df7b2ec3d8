"""A new user's README path at tiny sizes: the demo job (train every stage, evaluate, export, predict a scene),
then eval.py and the predict CLI on what it produced."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.helpers import train_run as tr

ROOT = Path(__file__).resolve().parents[1]

# The demo's data and the pipeline's stage runs (steps, learning rates, warmup, batch 4: the programs of
# test_train's run, so the two compile them once).
TINY = [
    "--config.data.synthetic_scenes=10",
    "--config.data.synthetic_size=32",
    "--config.data.crop_size=32",
    "--config.latent_stats.batches=2",
    "--config.latent_stats.batch_size=4",
    "--config.flow.sample_steps=2",
]
for _stage, _run in tr.STAGE_RUNS.items():
    TINY += [f"--config.{_stage}.steps={_run['steps']}", f"--config.{_stage}.lr={_run['lr']}",
             f"--config.{_stage}.batch_size={tr.BATCH}", f"--config.{_stage}.warmup_steps={tr.WARMUP}"]


def run(args, **kw):
    env = tr.test_env(PYTHONUNBUFFERED="1")  # the environment of the tiny runs: their compiled programs
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                         **kw)
    assert out.returncode == 0, f"{args}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    out = run(["train.py", "--config=configs/demo.py", f"--workdir={workdir}", *TINY])
    return workdir, out.stdout


def test_demo_trains_every_stage_and_reports(demo):
    workdir, stdout = demo
    for stage in ("vae_s2", "vae_s1", "flow", "refiner"):
        assert (workdir / stage / "final" / "DONE").exists(), stage
        trace = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        assert trace and all(np.isfinite(r["loss"]) for r in trace)
        assert list((workdir / stage / "tb").iterdir()), "no TensorBoard events"
        assert list((workdir / stage / "previews").glob("*.png"))
    stats = json.loads((workdir / "latent_stats" / "latent_stats.json").read_text())
    assert stats["vae_s2"]["scale_factor"] > 0 and stats["vae_s1"]["scale_factor"] > 0
    # The metrics table (model vs cloudy input and the learning-free references) and where the pictures are.
    assert "cloudy_input" in stdout and "psnr" in stdout and "examples_" in stdout
    assert "mean_fill" in stdout and "biharmonic" in stdout


def test_demo_evaluation_outputs(demo):
    workdir, _ = demo
    result = json.loads((workdir / "eval_test" / "metrics.json").read_text())
    assert result["split"] == "test" and result["protocol"] == "exact" and result["num_images"] >= 1
    for group in ("model", "cloudy_input", "model_cloudy_pixels", "cloudy_input_cloudy_pixels"):
        assert set(result[group]) == {"psnr", "ssim", "sam", "mae", "rmse"}
    assert result["clipped_to_unit_range"] is True
    rows = (workdir / "eval_test" / "per_image.csv").read_text().splitlines()
    assert len(rows) == result["num_images"] + 1
    for name in ("worst", "median", "best"):
        assert (workdir / "eval_test" / f"examples_{name}.png").stat().st_size > 0


def test_demo_scene_prediction_keeps_georeferencing(demo):
    workdir, _ = demo
    scene = workdir / "scene"
    with rasterio.open(scene / "s2_cloudy.tif") as src, rasterio.open(scene / "prediction.tif") as pred:
        assert (pred.crs, pred.transform, pred.width, pred.height) == (src.crs, src.transform, src.width, src.height)
        assert pred.count == 13 and pred.dtypes[0] == "uint16"
    assert (scene / "uncertainty.tif").exists() and (scene / "scene.png").exists()


def test_eval_and_predict_clis_on_the_demo_outputs(demo, tmp_path):
    workdir, _ = demo
    out = run(["eval.py", f"--workdir={workdir}", "--split=val", "--steps=1", f"--out={tmp_path / 'val'}"])
    assert "model" in out.stdout
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["split"] == "val"
    # Unset flags come from the run's config: a copy of the run whose config.json asks for other settings.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval_*", "scene", "bundle", "checkpoints"))
    config = json.loads((copy / "config.json").read_text())
    config["eval"].update(split="train", max_images=2, write_geotiff=True, num_samples=1)
    config["flow"]["sample_steps"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    run(["eval.py", f"--workdir={copy}", "--no_references"])
    metrics = json.loads((copy / "eval_train" / "metrics.json").read_text())
    assert (metrics["split"], metrics["num_images"], metrics["steps"]) == ("train", 2, 1)
    assert len(list((copy / "eval_train").rglob("*.tif"))) == 2
    run(["eval.py", f"--workdir={copy}", "--no_references", "--max_images=1", "--nogeotiff", "--split=val"])
    metrics = json.loads((copy / "eval_val" / "metrics.json").read_text())
    assert (metrics["split"], metrics["num_images"]) == ("val", 1)
    assert not list((copy / "eval_val").rglob("*.tif"))
    scene = workdir / "scene"
    run(["-m", "crrf_jax.predict", f"--bundle={workdir / 'bundle'}", f"--s2={scene / 's2_cloudy.tif'}",
         f"--out={tmp_path / 'nosar.tif'}", "--steps=1"])
    with rasterio.open(tmp_path / "nosar.tif") as pred:
        assert pred.count == 13
