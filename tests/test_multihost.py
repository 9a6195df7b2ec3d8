"""Two processes on 127.0.0.1 train, measure, evaluate and predict together, as one job over their devices.

Each process has one CPU device; `jax.distributed.initialize` (coordinator, process count and id from
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) joins them into one 2-device mesh, the CPU
collectives run over gloo.

- train.py: the S2 and S1 autoencoders, the latent statistics and the flow model (tiny, a few steps). Each
  process reads its own shard of the data (2 of the global batch of 4), the global batch is assembled with
  jax.make_array_from_process_local_data, and Orbax writes the checkpoints from both. Both processes log their
  own metrics and preview grids (test hook), which must agree; the latent statistics must be those of both
  shards' latents together.
- eval.py and the predict CLI: every batch of tiles is split over both processes' devices; the results must
  be the one-process results, written once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import train_run as tr
from tests.helpers import with_devices

# vae_s2 takes no step (its initial weights become its final ones: one training step less to compile); the S1
# autoencoder and the flow model train.
STEPS = {"vae_s2": 0, "vae_s1": 4, "flow": 2}
# A preview in the autoencoder stage. (Sampling over both processes' devices is checked bit for bit against one
# process below, by eval.py and the predict CLI: a flow preview would compile that sampler once more in each.)
PREVIEW_EVERY = {"vae_s1": 4}
LATENT_BATCHES, LATENT_BATCH = 2, 4
EVAL_FLAGS = ["--split=test", "--steps=1", "--batch_size=4", "--no_references"]
SCENE = (40, 72)  # 2 x 3 tiles of 32 (overlap 4): a full batch of 4 tiles and a padded one
PREDICT_FLAGS = ["--steps=1", "--samples=2", "--batch-size=4", "--quiet"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = tr.write_dataset(base / "synthetic")
    workdir = tmp_path_factory.mktemp("multihost")
    flags = tr.base_flags(root, workdir, stage="") + ["--config.model.refiner.enabled=False"]
    for stage, steps in STEPS.items():
        flags += tr.stage_flags(stage, steps=steps, lr=2e-3, checkpoint_every=2)
        flags += [f"--config.{stage}.preview_every={PREVIEW_EVERY.get(stage, 0)}"]
    flags += [f"--config.latent_stats.batches={LATENT_BATCHES}",
              f"--config.latent_stats.batch_size={LATENT_BATCH}"]
    envs = tr.distributed_env(2, CRRF_TEST_TRACE_ALL="1")
    return workdir, tr.run_concurrently({i: (flags, envs[i]) for i in range(2)}, timeout=400)


@pytest.fixture(scope="module")
def inference_runs(two_process_run, tmp_path_factory):
    """eval.py and the predict CLI, each by two processes and by one, all at once."""
    from crrf_jax import export
    from crrf_jax.data import synthetic

    workdir, train = two_process_run
    assert all(out.returncode == 0 for out in train.values()), "training failed (see test_training_finishes)"
    out = tmp_path_factory.mktemp("inference")
    bundle = export.export_bundle(workdir, out / "bundle")
    scene = synthetic.write_synthetic_scene(out / "scene", *SCENE, seed=5)
    predict = ["-m", "crrf_jax.predict", f"--bundle={bundle}", f"--s2={scene['s2_cloudy']}",
               f"--s1={scene['s1']}", *PREDICT_FLAGS]
    commands = {
        "eval": lambda name: ["eval.py", f"--workdir={workdir}", f"--out={out / name}", *EVAL_FLAGS],
        "predict": lambda name: [*predict, f"--out={out / name}.tif", f"--uncertainty={out / name}_std.tif"],
    }
    # The one-process runs have two (simulated) devices, so every device computes what it computes in the
    # two-process runs: the results must be identical, bit for bit.
    one = tr.test_env()
    one["XLA_FLAGS"] = with_devices(one["XLA_FLAGS"], 2)
    runs = {}
    # The two-process eval waits for each batch in a thread of its own (--overlap, an accelerator's default):
    # its gathers run there, in the order both processes submit.
    overlap = {"eval": ["--overlap"], "predict": []}
    for command, args in commands.items():  # each two-process job has its own coordinator
        runs[(command, "one", 0)] = (args("one"), one)
        for i, env in enumerate(tr.distributed_env(2)):
            runs[(command, "two", i)] = (args("two") + overlap[command], env)
    return out, tr.run_concurrently(runs, timeout=400, start=tr.start_python)


def test_training_finishes(two_process_run):
    _, out = two_process_run
    for i in range(2):
        assert out[i].returncode == 0, f"process {i}:\n{out[i].stderr[-4000:]}"
    assert "over 2 devices (2 processes)" in out[0].stderr


def test_losses_agree_across_processes(two_process_run):
    workdir, _ = two_process_run
    for stage, steps in STEPS.items():
        if not steps:
            continue
        traces = [tr.read_trace(workdir / stage / f"metrics.p{i}.jsonl") for i in range(2)]
        assert sorted(traces[0]) == sorted(traces[1]) == list(range(1, steps + 1))
        for step in traces[0]:
            assert traces[0][step]["loss"] == traces[1][step]["loss"]
            assert traces[0][step]["grad_norm"] == traces[1][step]["grad_norm"]
        assert np.all(np.isfinite([e["loss"] for e in traces[0].values()]))


def test_one_checkpoint_from_both_processes(two_process_run):
    workdir, _ = two_process_run
    stage, steps = "vae_s1", STEPS["vae_s1"]
    step_dir = workdir / stage / "checkpoints" / str(steps)
    assert (step_dir / "state").is_dir()
    # One data-iterator state per process, each at the same position of its own shard.
    states = [json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert all(s["pipeline"] for s in states)
    state = tr.read_checkpoint_state(step_dir)
    assert int(state["step"]) == steps
    assert (workdir / stage / "final" / "DONE").read_text().strip() == str(steps)


def test_previews_agree_across_processes_and_are_written_once(two_process_run):
    from PIL import Image

    from crrf_jax import rundir

    workdir, _ = two_process_run
    for stage, every in PREVIEW_EVERY.items():
        stage_dir = workdir / stage
        grids = [np.load(stage_dir / f"preview_{every}.p{i}.npy") for i in range(2)]
        np.testing.assert_array_equal(grids[0], grids[1])  # the same rows, the same computation
        assert grids[0].shape[0] > 4 * 32  # the first 4 rows of the global batch: 2 from each process
        pngs = sorted((stage_dir / "previews").iterdir())
        assert [p.name for p in pngs] == [f"{every:07d}.png"]
        assert str(pngs[0]) == str(rundir.preview_path(stage_dir, every))
        np.testing.assert_array_equal(np.asarray(Image.open(pngs[0]).convert("RGB")), grids[0][..., :3])


def test_latent_stats_are_those_of_both_shards(two_process_run):
    """latent_stats.json against the moments of both processes' shards, measured here one shard at a time
    and merged (and the values count is the union's)."""
    from crrf_jax import rundir, stages, train_lib

    workdir, _ = two_process_run
    config = rundir.load_run_config(workdir)
    written = json.loads(Path(rundir.latent_stats_path(workdir)).read_text())
    shards = [stages.shard_moments(config, str(workdir), LATENT_BATCH // 2, shard=(i, 2)) for i in range(2)]
    for stage in ("vae_s2", "vae_s1"):
        union = train_lib.LatentMoments()
        for shard in shards:
            union.merge(shard[stage].n, shard[stage].mean, shard[stage].m2)
        scale, shift = union.scale_shift()
        assert written[stage]["values"] == union.n == 2 * shards[0][stage].n
        got = [written[stage]["scale_factor"], written[stage]["shift_factor"]]
        np.testing.assert_allclose(got, [scale, shift], rtol=1e-5, atol=1e-6)
        # Not process 0's shard alone.
        alone = shards[0][stage].scale_shift()
        assert not np.allclose(alone, (scale, shift), rtol=1e-5, atol=1e-6)


def test_latent_moments_merge_is_the_union():
    """Chan's merge of parts (unequal sizes, different means) = the moments of all values together."""
    from crrf_jax import parallel, train_lib

    rng = np.random.default_rng(0)
    sizes = ((3.0, 0.5, 1000), (-1.0, 2.0, 37), (0.1, 1.0, 1))
    parts = [rng.normal(loc, scale, size) for loc, scale, size in sizes]
    merged = train_lib.LatentMoments()
    for part in parts:
        m = train_lib.LatentMoments()
        m.update(part)
        merged.merge(m.n, m.mean, m.m2)
    merged.merge(0, 0.0, 0.0)  # an empty part changes nothing
    union = np.concatenate(parts)
    assert merged.n == union.size
    np.testing.assert_allclose(merged.mean, union.mean(), rtol=1e-12)
    np.testing.assert_allclose(merged.m2, ((union - union.mean()) ** 2).sum(), rtol=1e-12)
    np.testing.assert_allclose(merged.scale_shift(), (1 / union.std(ddof=1), union.mean()), rtol=1e-12)
    # One process: the float64 gather is the values themselves, exactly.
    values = [1e9 + 0.123456789, 1 / 3, -2.5e-300]
    assert parallel.allgather_float64(values).tolist() == [values]


def test_eval_over_two_processes_is_the_one_process_eval(inference_runs):
    out, runs = inference_runs
    for key, run in runs.items():
        if key[0] == "eval":
            assert run.returncode == 0, f"{key}:\n{run.stderr[-4000:]}"
    # Process 0 prints the table; process 1 prints nothing.
    assert "model" in runs[("eval", "two", 0)].stdout and "model" not in runs[("eval", "two", 1)].stdout
    one, two = (json.loads((out / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert one["num_images"] == two["num_images"] > 0
    assert (one["model_overlapped"], two["model_overlapped"]) == (False, True)
    for group in ("model", "model_cloudy_pixels", "cloudy_input"):
        assert two[group] == one[group], group
    rows = [(out / name / "per_image.csv").read_text() for name in ("one", "two")]
    assert rows[0] == rows[1]  # the same images, in order, with the same scores
    assert sorted(p.name for p in (out / "two").iterdir()) == sorted(p.name for p in (out / "one").iterdir())


def test_scene_prediction_over_two_processes_is_the_one_process_prediction(inference_runs):
    import rasterio

    out, runs = inference_runs
    for key, run in runs.items():
        if key[0] == "predict":
            assert run.returncode == 0, f"{key}:\n{run.stderr[-4000:]}"
    assert "wrote" in runs[("predict", "two", 0)].stdout and "wrote" not in runs[("predict", "two", 1)].stdout

    def read(path):
        with rasterio.open(path) as src:
            return src.read(), src.transform

    for suffix in (".tif", "_std.tif"):
        (a, ta), (b, tb) = read(f"{out / 'one'}{suffix}"), read(f"{out / 'two'}{suffix}")
        assert a.shape[1:] == SCENE and ta == tb
        np.testing.assert_array_equal(b, a)
    assert not list(out.glob("*.partial"))
