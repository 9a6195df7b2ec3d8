"""train.py end to end on tiny synthetic data: every stage learns, and bad input gets a one-line error.

One train.py process runs the whole pipeline (S2 autoencoder, S1 autoencoder, latent statistics, flow,
refiner) with the tiny model on 32x32 crops, logging every step; each stage's loss must fall clearly. The
refiner stage then resumes exactly after a SIGTERM, on top of the finished flow.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import train_run as tr

STAGE_RUNS = tr.STAGE_RUNS  # shared with the other tiny runs (test_demo, test_resume, ...): one compilation


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = tr.write_dataset(base / "synthetic")
    workdir = tmp_path_factory.mktemp("pipeline")
    flags = tr.base_flags(root, workdir)  # no stage: all of them in order
    for stage, run in STAGE_RUNS.items():
        flags += tr.stage_flags(stage, **run)
    flags += ["--config.latent_stats.batches=2", f"--config.latent_stats.batch_size={tr.BATCH}"]
    out = tr.run_train(flags, tr.test_env())
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir


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
    """The refiner stage stopped by SIGTERM at step 6 and resumed ends where the uninterrupted run ended."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path_factory.mktemp("refiner_resume") / "run"
    shutil.copytree(pipeline, workdir, ignore=shutil.ignore_patterns("refiner"))
    flags = tr.base_flags(base / "synthetic", workdir, "refiner")
    flags += tr.stage_flags("refiner", **STAGE_RUNS["refiner"], checkpoint_every=4)
    env = tr.test_env()
    first = tr.run_train(flags, {**env, "CRRF_TEST_SIGTERM_AT_STEP": "6"})
    assert first.returncode == 0, first.stderr[-4000:]
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


# FLUX.1-dev's flags at tiny widths: the guidance embedder and a 768-wide conditioning vector.
FLUX_SHAPED = ["--config.model.flux.guidance_embed=True", "--config.model.flux.vec_in_dim=768",
               "--config.model.cloud_cnn.out_dim=768", "--config.model.embedded_guidance=3.5"]


def test_flux_shaped_model_trains_evaluates_exports_and_predicts(pipeline, tmp_path_factory):
    """The flow and refiner stages of the `flux` variant's layout (guidance embedder, vec_in_dim 768) on top
    of the pipeline's autoencoders, then eval.py, export and the predict CLI on what they produced."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path_factory.mktemp("flux_shaped") / "run"
    shutil.copytree(pipeline, workdir, ignore=shutil.ignore_patterns("flow", "refiner"))
    flags = tr.base_flags(base / "synthetic", workdir) + FLUX_SHAPED
    flags += tr.stage_flags("flow", steps=4, lr=1e-3) + tr.stage_flags("refiner", steps=2, lr=1e-3)
    flags += ["--config.flow.sample_steps=1", "--config.eval.max_images=2", "--config.eval.batch_size=2"]
    out = tr.run_train(flags, tr.test_env())
    assert out.returncode == 0, out.stderr[-4000:]
    assert "vae_s2: already finished" in out.stderr
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["flux"]["guidance_embed"] and config["model"]["embedded_guidance"] == 3.5
    assert np.all(np.isfinite(tr.losses(workdir / "flow" / "metrics.jsonl")))

    env = tr.test_env()

    def cli(*args):
        return subprocess.run([sys.executable, *args], cwd=tr.ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    evaluated = cli("eval.py", f"--workdir={workdir}", "--no_references")
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert json.loads((workdir / "eval_test" / "metrics.json").read_text())["num_images"] == 2
    exported = cli("-m", "crrf_jax.export", f"--workdir={workdir}", f"--out={workdir / 'bundle'}")
    assert exported.returncode == 0, exported.stderr[-4000:]
    bundle = json.loads((workdir / "bundle" / "config.json").read_text())
    assert bundle["model"]["flux"]["guidance_embed"] and bundle["model"]["embedded_guidance"] == 3.5
    from crrf_jax.data import synthetic

    scene = synthetic.write_synthetic_scene(workdir / "scene", 40, 48, seed=5)
    predicted = cli("-m", "crrf_jax.predict", f"--bundle={workdir / 'bundle'}", f"--s2={scene['s2_cloudy']}",
                    f"--s1={scene['s1']}", f"--out={workdir / 'clear.tif'}", "--steps=1", "--quiet")
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    import rasterio

    with rasterio.open(workdir / "clear.tif") as clear:
        assert (clear.count, clear.height, clear.width) == (13, 40, 48)
        assert clear.read().max() > 0


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
