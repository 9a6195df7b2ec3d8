"""Two train.py processes on 127.0.0.1 train one stage together and save one multi-process checkpoint.

Each process has one CPU device; `jax.distributed.initialize` (coordinator, process count and id from
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) joins them into one 2-device mesh, the CPU
collectives run over gloo. Each process reads its own shard of the data (2 of the global batch of 4), the
global batch is assembled with jax.make_array_from_process_local_data, and Orbax writes the checkpoint from
both. Both processes log their own metrics (test hook), which must agree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import train_run as tr

STAGE, STEPS = "vae_s1", 4


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = tr.write_dataset(base / "synthetic")
    workdir = tmp_path_factory.mktemp("multihost")
    flags = tr.base_flags(root, workdir, STAGE)
    flags += tr.stage_flags(STAGE, steps=STEPS, lr=2e-3, checkpoint_every=2)
    coordinator = f"127.0.0.1:{tr.free_port()}"
    runs = {
        i: (
            flags,
            tr.test_env(
                base / "jax_cache", JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i), CRRF_TEST_TRACE_ALL="1",
            ),
        )
        for i in range(2)
    }
    return workdir, tr.run_concurrently(runs, timeout=300)


def test_both_processes_finish(two_process_run):
    _, out = two_process_run
    for i in range(2):
        assert out[i].returncode == 0, f"process {i}:\n{out[i].stderr[-4000:]}"
    assert "over 2 devices (2 processes)" in out[0].stderr


def test_losses_agree_across_processes(two_process_run):
    workdir, _ = two_process_run
    traces = [tr.read_trace(workdir / STAGE / f"metrics.p{i}.jsonl") for i in range(2)]
    assert sorted(traces[0]) == sorted(traces[1]) == list(range(1, STEPS + 1))
    for step in traces[0]:
        assert traces[0][step]["loss"] == traces[1][step]["loss"]
        assert traces[0][step]["grad_norm"] == traces[1][step]["grad_norm"]
    assert np.all(np.isfinite([e["loss"] for e in traces[0].values()]))


def test_one_checkpoint_from_both_processes(two_process_run):
    workdir, _ = two_process_run
    step_dir = workdir / STAGE / "checkpoints" / str(STEPS)
    assert (step_dir / "state").is_dir()
    # One data-iterator state per process, each at the same position of its own shard.
    states = [json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert all(s["pipeline"] for s in states)
    state = tr.read_checkpoint_state(step_dir)
    assert int(state["step"]) == STEPS
    assert (workdir / STAGE / "final" / "DONE").read_text().strip() == str(STEPS)
