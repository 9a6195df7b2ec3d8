"""`--workdir=gs://bucket/run`: every file of a run goes through etils.epath, offline (tests.helpers.fake_gcs).

The fake serves gs://<bucket>/<key> from a local folder through fsspec, the backend epath uses for gs:// (gcsfs
in production), and refuses appends as object stores do. A tiny train.py run (both autoencoders, the latent
statistics and the flow) on a gs:// workdir, started in an empty working directory, must leave it empty (a plain
`os`/`open()` call on a gs:// path would create a folder named `gs:` there) and put its config, metrics traces,
TensorBoard events, previews, latent statistics, DONE markers, checkpoints and final weights in the bucket; the
run is then exported from gs:// to a gs:// bundle (safetensors as bytes) and read back.

Covered: every read and write crrf_jax makes itself (rundir, trainer, checkpoint, visualize, bundle, export,
evaluation's tables and pictures) on the epath -> fsspec path, and where a URL workdir's latent cache goes (as
a path: the run does not cache latents, to share test_train's compiled programs).
Not covered: Orbax's own GCS path. Its arrays go through TensorStore's native GCS driver (HTTP) and it asks
google-cloud-storage about the bucket, neither possible offline, so Orbax is handed the folder behind each gs://
path (`fake_gcs.orbax_in_folder`): the checkpoints land in the bucket's folder and crrf_jax checks them through
gs:// paths, but TensorStore's gcs driver and Orbax's commit-file atomicity are not run here. Nor are the
refiner stage (no path of its own) and evaluation's scoring (only its writes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from crrf_jax import evaluation, paths, rundir, trainer
from crrf_jax import visualize as vis
from tests.helpers import fake_gcs
from tests.helpers import train_run as tr

RUN = "gs://bucket/run"
# The stage runs of test_train (same programs: one XLA compilation for both in a session); a model without the
# refiner, whose stage adds no path of its own.
STAGE_RUNS = {stage: tr.STAGE_RUNS[stage] for stage in ("vae_s2", "vae_s1", "flow")}
STAGES = tuple(STAGE_RUNS)


def test_rundir_paths_keep_the_scheme():
    stage = rundir.stage_path("gs://b/run", "vae_s2")
    assert os.fspath(stage / "final") == "gs://b/run/vae_s2/final"
    assert os.fspath(rundir.checkpoints_dir(stage)) == "gs://b/run/vae_s2/checkpoints"
    assert str(rundir.preview_path(stage, 7)) == "gs://b/run/vae_s2/previews/0000007.png"
    assert str(rundir.run_config_path("gs://b/run/")) == "gs://b/run/config.json"
    assert str(rundir.eval_dir("gs://b/bundle", "test")) == "gs://b/bundle/eval_test"
    assert str(rundir.latent_stats_path("s3://b/run")) == "s3://b/run/latent_stats/latent_stats.json"
    # Local paths are made absolute (Orbax wants absolute paths).
    assert str(rundir.stage_path("runs/x", "flow")) == os.path.join(os.getcwd(), "runs", "x", "flow")
    # The latent cache is memory-mapped: local scratch for a URL workdir.
    cache = rundir.latent_cache_dir("gs://b/run")
    assert not paths.is_url(cache) and str(cache).startswith(tempfile.gettempdir())
    assert str(cache).endswith(os.path.join("crrf_jax_latents", "gs", "b", "run", "p0"))


def test_the_demo_asks_for_a_local_workdir():
    """Its synthetic data and scene are GeoTIFFs, written with rasterio: a gs:// workdir is refused up front."""
    from crrf_jax import export

    config = export.load_config_file(str(tr.ROOT / "configs" / "demo.py"))
    with pytest.raises(ValueError, match="needs a local --workdir"):
        trainer.prepare_data(config, "gs://b/run")


@pytest.fixture
def bucket(tmp_path):
    root = tmp_path / "gcs"
    root.mkdir()
    with fake_gcs.installed(root):
        yield root


def test_metrics_trace_is_written_whole_on_an_object_store(bucket):
    """The fake refuses appends: the trace must be rewritten whole, and a resume drops the later entries."""
    path = "gs://b/run/vae_s2/metrics.jsonl"
    trace = trainer.MetricsTrace(path, 0)
    for step in range(1, 5):
        trace.write(step, {"loss": float(step)})
    on_disk = bucket / "b" / "run" / "vae_s2" / "metrics.jsonl"
    assert sorted(tr.read_trace(on_disk)) == [1, 2, 3, 4]
    resumed = trainer.MetricsTrace(path, 2)
    resumed.write(3, {"loss": 30.0})
    entries = tr.read_trace(on_disk)
    assert sorted(entries) == [1, 2, 3] and entries[3]["loss"] == 30.0


def test_pictures_and_tables_are_written_through_epath(bucket):
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    assert vis.save_png(image, "gs://b/pics/x.png") == "gs://b/pics/x.png"
    np.testing.assert_array_equal(np.asarray(Image.open(bucket / "b" / "pics" / "x.png")), image)
    out = "gs://b/run/eval_test"
    paths.as_path(out).mkdir(parents=True, exist_ok=True)
    rows = [{"id": "a", "psnr": 30.5}, {"id": "b", "psnr": float("nan")}]
    evaluation._write_tables(out, {"num_images": 2, "model": {"psnr": 30.5}}, rows)
    assert json.loads((bucket / "b" / "run" / "eval_test" / "metrics.json").read_text())["num_images"] == 2
    assert (bucket / "b" / "run" / "eval_test" / "per_image.csv").read_text().splitlines() == [
        "id,psnr", "a,30.5", "b,nan"]


def test_without_a_gcs_backend_gs_paths_fail_clearly():
    """No gcsfs installed and no fake: epath names the missing package rather than writing a local `gs:`."""
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="gcsfs"):
            paths.as_path("gs://b/run/config.json").exists()
    else:
        pytest.skip("gcsfs is installed: gs:// would reach the network")


@pytest.fixture(scope="module")
def gcs_run(tmp_path_factory):
    """A tiny train.py run (autoencoders, latent statistics, flow on cached latents) with
    --workdir=gs://bucket/run, in an empty working directory."""
    base = tmp_path_factory.getbasetemp()
    data = tr.write_dataset(base / "synthetic")  # the data root stays local (rasterio reads it)
    home = tmp_path_factory.mktemp("remote_workdir")
    root, cwd = home / "gcs", home / "cwd"
    root.mkdir()
    cwd.mkdir()
    flags = tr.base_flags(data, RUN) + ["--config.model.refiner.enabled=False"]
    flags[0] = f"--config={tr.ROOT / 'configs' / 'demo.py'}"  # run from `cwd`, not the repository
    for stage, run in STAGE_RUNS.items():
        flags += tr.stage_flags(stage, **run)
    flags += ["--config.vae_s2.preview_every=12", "--config.latent_stats.batches=2",
              f"--config.latent_stats.batch_size={tr.BATCH}"]
    env = tr.test_env(CRRF_TEST_FAKE_GCS=str(root))
    out = subprocess.run([sys.executable, "-m", "tests.helpers.train_hooks", *flags], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return {"root": root, "cwd": cwd, "run": root / "bucket" / "run"}


def test_a_gcs_run_writes_nothing_locally(gcs_run):
    assert list(gcs_run["cwd"].iterdir()) == []
    assert not (tr.ROOT / "gs:").exists()


def test_a_gcs_run_puts_every_output_in_the_bucket(gcs_run):
    run = gcs_run["run"]
    assert json.loads((run / "config.json").read_text())["flow"]["steps"] == STAGE_RUNS["flow"]["steps"]
    stats = json.loads((run / "latent_stats" / "latent_stats.json").read_text())
    assert stats["vae_s2"]["scale_factor"] > 0
    for stage, stage_run in STAGE_RUNS.items():
        steps = stage_run["steps"]
        assert sorted(tr.read_trace(run / stage / "metrics.jsonl")) == list(range(1, steps + 1)), stage
        assert (run / stage / "final" / "DONE").read_text().strip() == str(steps)
        assert (run / stage / "final" / "weights").is_dir()
        assert (run / stage / "checkpoints" / str(steps) / "state").is_dir()
        events = list((run / stage / "tb").glob("events.out.tfevents.*"))
        assert len(events) == 1 and b"train/loss" in events[0].read_bytes(), stage
    preview = Image.open(run / "vae_s2" / "previews" / f"{STAGE_RUNS['vae_s2']['steps']:07d}.png")
    assert preview.format == "PNG" and preview.size[0] > 32
    assert b"vae_s2/preview" in next((run / "vae_s2" / "tb").glob("events.*")).read_bytes()


def test_a_gcs_run_exports_to_a_gcs_bundle(gcs_run):
    from crrf_jax import bundle, export
    from crrf_jax.inference import CloudRemover

    with fake_gcs.installed(gcs_run["root"]), pytest.MonkeyPatch.context() as mp:
        fake_gcs.orbax_in_folder(gcs_run["root"], mp.setattr)
        written = export.export_bundle(RUN, "gs://bucket/bundle")
        assert str(written) == "gs://bucket/bundle"
        parts = rundir.read_workdir(RUN)
        loaded = bundle.read_bundle("gs://bucket/bundle")
        remover = CloudRemover.from_bundle("gs://bucket/bundle")
    on_disk = gcs_run["root"] / "bucket" / "bundle"
    weights = {f for n, f in bundle.WEIGHT_FILES.items() if n != "refiner"}
    assert {p.name for p in on_disk.iterdir()} == {*weights, "config.json", "latent_stats.json", "README.txt"}
    assert not (gcs_run["root"] / "bucket" / "bundle.partial").exists()
    assert loaded.source == "gs://bucket/bundle" and parts.source == RUN
    for name, state in parts.states.items():
        assert set(loaded.states[name]) == set(state), name
        for key, value in state.items():
            np.testing.assert_array_equal(np.asarray(loaded.states[name][key]).reshape(np.shape(value)), value)
    assert remover.band_indices == tuple(parts.config["bands"]["indices"])
