"""train.py end to end on tiny synthetic data: the README's demo job, every stage learns, the CLIs on what it
produced, exact resumption, and bad input gets a one-line error (the FLUX.1-dev layout at tiny widths trains in
tests/test_benchmark_configs.py).

One train.py process runs the demo config (`configs/demo.py`, the README's quick start) at tiny sizes: it writes
16 synthetic 32x32 scenes (the data of `tests.helpers.train_run.write_dataset`) and their cloud probability,
trains the S2 autoencoder, the S1 autoencoder, measures the latent statistics, trains the flow model and the
refiner on 32x32 crops logging every step (each stage's loss must fall clearly), evaluates the test split
against the cloudy input and the learning-free references, exports a bundle and removes clouds from the demo
scene. eval.py and the predict CLI then run on what it produced; the refiner stage resumes exactly after a
SIGTERM, on top of the finished flow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from tests.helpers import train_run as tr

STAGE_RUNS = tr.STAGE_RUNS  # shared with the other tiny runs (test_resume, test_remote_workdir, ...)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(workdir, stdout) of the demo job; its synthetic data is in <workdir>/data."""
    workdir = tmp_path_factory.mktemp("demo") / "run"
    flags = ["--config=configs/demo.py", f"--workdir={workdir}", f"--config.data.synthetic_scenes={tr.SCENES}",
             f"--config.data.synthetic_size={tr.SIZE}", f"--config.data.crop_size={tr.SIZE}",
             "--config.latent_stats.batches=2", f"--config.latent_stats.batch_size={tr.BATCH}",
             "--config.flow.sample_steps=2"]
    for stage, run in STAGE_RUNS.items():  # one preview a stage, at its end
        flags += tr.stage_flags(stage, **run, preview_every=run["steps"])
    out = tr.run_train(flags, tr.test_env(PYTHONUNBUFFERED="1"), timeout=600)
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}"
    return workdir, out.stdout


@pytest.fixture(scope="module")
def pipeline(demo):
    return demo[0]


DEMO_TAIL = ("eval_*", "scene", "bundle")  # what the demo writes after training (left out of copies of its run)


@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_loss_falls(pipeline, stage):
    loss = tr.losses(pipeline / stage / "metrics.jsonl")
    assert len(loss) == STAGE_RUNS[stage]["steps"]
    assert np.all(np.isfinite(loss))
    window = 3 if stage.startswith("vae") else 5  # the flow loss is noisier (random t and noise per step)
    first, last = loss[:window].mean(), loss[-window:].mean()
    assert last < 0.85 * first, f"{stage}: loss {first:.4f} (first {window} steps) -> {last:.4f} (last)"


def test_pipeline_outputs(pipeline):
    for stage in STAGE_RUNS:
        assert (pipeline / stage / "final" / "DONE").read_text().strip() == str(STAGE_RUNS[stage]["steps"])
    stats = json.loads((pipeline / "latent_stats" / "latent_stats.json").read_text())
    for vae in ("vae_s2", "vae_s1"):
        assert stats[vae]["scale_factor"] > 0 and np.isfinite(stats[vae]["shift_factor"])
    entry = tr.read_trace(pipeline / "flow" / "metrics.jsonl")[1]
    assert {"loss", "flow_mse", "grad_norm", "lr", "step_time_s", "samples_per_s"} <= set(entry)
    entry = tr.read_trace(pipeline / "refiner" / "metrics.jsonl")[1]
    assert {"loss", "l1", "ssim", "input_l1", "trust"} <= set(entry)


def test_refiner_stage_resumes_exactly(pipeline, tmp_path_factory):
    """The refiner stage stopped by SIGTERM at step 6 (it saves and exits) and resumed ends where the
    uninterrupted run ended."""
    workdir = tmp_path_factory.mktemp("refiner_resume") / "run"
    shutil.copytree(pipeline, workdir, ignore=shutil.ignore_patterns("refiner", *DEMO_TAIL))
    flags = tr.base_flags(workdir / "data", workdir, "refiner")
    flags += tr.stage_flags("refiner", **STAGE_RUNS["refiner"], checkpoint_every=4)
    env = tr.test_env()
    first = tr.run_train(flags, {**env, "CRRF_TEST_SIGTERM_AT_STEP": "6"})
    # A preemption notice: the step's checkpoint is saved and the run exits cleanly, unfinished.
    assert first.returncode == 0, first.stderr[-4000:]
    assert "preempted" in first.stderr
    assert sorted(p.name for p in (workdir / "refiner" / "checkpoints").iterdir()) == ["4", "6"]
    assert max(tr.read_trace(workdir / "refiner" / "metrics.jsonl")) == 6
    assert not (workdir / "refiner" / "final").exists()
    second = tr.run_train(flags, env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from step 6" in second.stderr
    steps = STAGE_RUNS["refiner"]["steps"]
    np.testing.assert_allclose(tr.losses(workdir / "refiner" / "metrics.jsonl"),
                               tr.losses(pipeline / "refiner" / "metrics.jsonl"), rtol=1e-5)
    resumed = tr.read_checkpoint_state(workdir / "refiner" / "checkpoints" / str(steps))
    reference = tr.read_checkpoint_state(pipeline / "refiner" / "checkpoints" / str(steps))
    for a, b in zip(jax_leaves(resumed), jax_leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nan_batches_stop_the_run_with_finite_checkpointed_weights(tmp_path_factory):
    """From step 7 on every batch is NaN: steps 7 and 8 are skipped on device (checkpoint 8 saved), step 9
    is the third in a row and halts training; the run exits with the message and checkpoint 8 is finite."""
    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path_factory.mktemp("nan_run")
    flags = tr.base_flags(tr.write_dataset(base / "synthetic"), workdir, "vae_s1")
    flags += tr.stage_flags("vae_s1", **tr.VAE_S1) + ["--config.vae_s1.max_bad_steps=3"]
    out = tr.run_train(flags, tr.test_env(CRRF_TEST_NAN_FROM_STEP="7"))
    assert out.returncode != 0
    assert "3 consecutive steps had non-finite loss or gradients, the last at step 9" in out.stderr
    assert "Traceback" not in out.stderr
    saved = (workdir / "vae_s1" / "checkpoints").iterdir()
    checkpoints = sorted(int(p.name) for p in saved if p.name.isdigit())
    assert checkpoints == [4, 8] and not (workdir / "vae_s1" / "final").exists()
    state = tr.read_checkpoint_state(workdir / "vae_s1" / "checkpoints" / "8")
    assert int(state["updates"]) == 6 and int(state["guard"]["consecutive"]) == 2
    assert all(np.isfinite(a).all() for a in jax_leaves((state["params"], state["ema"], state["opt_state"])))
    trace = tr.read_trace(workdir / "vae_s1" / "metrics.jsonl")
    assert [trace[s]["skipped"] for s in range(1, 10)] == [0] * 6 + [1] * 3


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def train_py(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """train.py itself (no test hooks), CPU only."""
    return subprocess.run(
        [sys.executable, "train.py", *flags], cwd=tr.ROOT, env=tr.test_env(),
        capture_output=True, text=True, timeout=120,
    )


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    out = train_py(tmp_path, "--config=configs/demo.py", f"--workdir={tmp_path}", "--config.nonexistent=1")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "--config.nonexistent=1: the config has no field 'nonexistent'" in out.stderr
    out = train_py(tmp_path, "--config=configs/demo.py", f"--workdir={tmp_path}", "--config.data.crop_sze=32")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no field 'crop_sze'" in out.stderr and 'Did you mean "crop_size"' in out.stderr


def test_empty_data_directory_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = train_py(
        tmp_path, "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}", "--config.demo=False",
        f"--config.data.root={empty}",
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert f"error: {empty}: no SEN12MS-CR triplets found" in out.stderr


# ----------------------------------------------------------------------------------------------------------------
# The demo's report, outputs and the CLIs on them
# ----------------------------------------------------------------------------------------------------------------


def test_demo_trains_every_stage_and_reports(demo):
    workdir, stdout = demo
    for stage in STAGE_RUNS:
        assert (workdir / stage / "final" / "DONE").exists(), stage
        assert list((workdir / stage / "tb").iterdir()), "no TensorBoard events"
        assert list((workdir / stage / "previews").glob("*.png"))
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
    """eval.py takes unset flags from the run's config and flags override them; the predict CLI without SAR."""
    workdir, _ = demo
    env = tr.test_env()

    def cli(*args):
        out = subprocess.run([sys.executable, *args], cwd=tr.ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"{args}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}"
        return out

    # A copy of the run whose config.json asks for other evaluation settings.
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(*DEMO_TAIL, "checkpoints"))
    config = json.loads((copy / "config.json").read_text())
    config["eval"].update(split="train", max_images=2, write_geotiff=True, num_samples=1)
    config["flow"]["sample_steps"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    cli("eval.py", f"--workdir={copy}", "--no_references")
    metrics = json.loads((copy / "eval_train" / "metrics.json").read_text())
    assert (metrics["split"], metrics["num_images"], metrics["steps"]) == ("train", 2, 1)
    assert len(list((copy / "eval_train").rglob("*.tif"))) == 2
    out = cli("eval.py", f"--workdir={copy}", "--max_images=1", "--nogeotiff", "--split=val", "--steps=2",
              f"--out={tmp_path / 'val'}")
    assert "model" in out.stdout and "biharmonic" in out.stdout
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert (metrics["split"], metrics["num_images"], metrics["steps"]) == ("val", 1, 2)
    assert not list((tmp_path / "val").rglob("*.tif"))
    scene = workdir / "scene"
    cli("-m", "crrf_jax.predict", f"--bundle={workdir / 'bundle'}", f"--s2={scene / 's2_cloudy.tif'}",
        f"--out={tmp_path / 'nosar.tif'}", "--steps=1")
    with rasterio.open(tmp_path / "nosar.tif") as pred:
        assert pred.count == 13
