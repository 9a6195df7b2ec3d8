"""Interrupted training resumes exactly: SIGKILL (with a partial checkpoint), a corrupt checkpoint.

Every run trains the S1 autoencoder of the tiny model for 12 steps (checkpoints every 4) in a real train.py
process. A resumed run must log the same loss at every step and end with the same train state (parameters,
optimizer moments, EMA) as the uninterrupted run: the checkpoint holds the model and the data iterator.
The four runs go in three rounds: the uninterrupted run, the killed one, the two resumptions. (SIGTERM, the
preemption notice, is tested on the refiner stage in tests/test_train.py: it saves, exits and resumes there.)
"""

from __future__ import annotations

import shutil
import signal

import jax
import numpy as np
import pytest

from tests.helpers import train_run as tr

STAGE, STEPS, EVERY = "vae_s1", tr.VAE_S1["steps"], tr.VAE_S1["checkpoint_every"]
assert (STEPS, EVERY) == (12, 4), "the interruption steps below (6, 8) assume 12 steps, checkpoints every 4"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted; then SIGKILL right after the save of step 8 started. Then, concurrently: resume the killed
    run; resume the finished run with its newest checkpoint corrupted and its final weights removed."""
    base = tmp_path_factory.getbasetemp()
    root = tr.write_dataset(base / "synthetic")
    env = tr.test_env()
    work = tmp_path_factory.mktemp("resume")
    names = ("uninterrupted", "killed", "corrupt")
    dirs = {name: work / name for name in names}

    def job(name, **hooks):
        flags = tr.base_flags(root, dirs[name], STAGE)
        flags += tr.stage_flags(STAGE, **tr.VAE_S1)
        return flags, {**env, **hooks}

    # The uninterrupted run alone first: it fills the compilation cache the five others then read.
    first = tr.run_concurrently({"uninterrupted": job("uninterrupted")})
    assert first["uninterrupted"].returncode == 0, first["uninterrupted"].stderr[-4000:]
    first |= tr.run_concurrently({"killed": job("killed", CRRF_TEST_KILL_AFTER_SAVE="8")})
    snapshots = {"killed": _snapshot(dirs["killed"])}

    shutil.copytree(dirs["uninterrupted"], dirs["corrupt"])
    shutil.rmtree(dirs["corrupt"] / STAGE / "final")
    corrupted = _truncate_array_files(dirs["corrupt"] / STAGE / "checkpoints" / str(STEPS) / "state")

    second = tr.run_concurrently({"killed": job("killed"), "corrupt": job("corrupt")})
    return {"dirs": dirs, "first": first, "second": second, "snapshots": snapshots, "corrupted": corrupted}


def _snapshot(workdir):
    """What an interrupted run left: checkpoint directory names, last logged step, whether it finished."""
    checkpoints = workdir / STAGE / "checkpoints"
    return {
        "checkpoints": sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else [],
        "last_step": max(tr.read_trace(workdir / STAGE / "metrics.jsonl")),
        "finished": (workdir / STAGE / "final").exists(),
    }


def _truncate_array_files(state_dir):
    files = [p for p in state_dir.rglob("*") if p.is_file() and "d" in p.relative_to(state_dir).parts[:-1]]
    for path in files:
        path.write_bytes(b"")
    return files


def assert_same_run(workdir, reference):
    """Same loss at every step and the same final train state as the reference run."""
    np.testing.assert_allclose(
        tr.losses(workdir / STAGE / "metrics.jsonl"), tr.losses(reference / STAGE / "metrics.jsonl"),
        rtol=0, atol=1e-6,
    )
    got = tr.read_checkpoint_state(workdir / STAGE / "checkpoints" / str(STEPS))
    want = tr.read_checkpoint_state(reference / STAGE / "checkpoints" / str(STEPS))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert len(jax.tree.leaves(got)) > 10
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert (workdir / STAGE / "final" / "DONE").read_text().strip() == str(STEPS)


def test_uninterrupted_run_logs_every_step(runs):
    trace = tr.read_trace(runs["dirs"]["uninterrupted"] / STAGE / "metrics.jsonl")
    assert sorted(trace) == list(range(1, STEPS + 1))
    assert all(np.isfinite(e["loss"]) for e in trace.values())


def test_sigkill_with_partial_checkpoint_then_resume_matches_uninterrupted(runs):
    killed = runs["first"]["killed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    left = runs["snapshots"]["killed"]
    # Step 4 is complete; the save of step 8 was under way: only Orbax's temporary directory exists.
    assert "4" in left["checkpoints"] and "8" not in left["checkpoints"], left
    assert any(name.startswith("8.") for name in left["checkpoints"]), left
    assert left["last_step"] == 8 and not left["finished"]

    resumed = runs["second"]["killed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from step 4" in resumed.stderr
    assert_same_run(runs["dirs"]["killed"], runs["dirs"]["uninterrupted"])


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(runs):
    assert runs["corrupted"], "no array files found to corrupt"
    resumed = runs["second"]["corrupt"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    checkpoints = runs["dirs"]["corrupt"] / STAGE / "checkpoints"
    assert f"checkpoint {checkpoints}/{STEPS} could not be restored" in resumed.stderr
    assert "resumed from step 8" in resumed.stderr
    # The run reached step 12 again and replaced the corrupt checkpoint with a good one.
    assert_same_run(runs["dirs"]["corrupt"], runs["dirs"]["uninterrupted"])
