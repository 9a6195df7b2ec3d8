"""Shared pieces of the training tests: a tiny synthetic dataset, tiny train.py flags, subprocess runs.

Every run is a real `train.py` process (through `tests.helpers.train_hooks`, which adds test-only hooks such
as "send SIGKILL after the save of step 8"). Every run, on either pytest-xdist worker, and the tests' own
process share one persistent XLA compilation cache (tests/conftest.py, `cache_dir`), so a program another run
or test has compiled (the same configuration, shapes and flags) is read rather than compiled again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.helpers import CHEAP_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[2]

# Sizes of the tiny runs: 16 synthetic 32x32 scenes (12 in the train split), batches of 4 32x32 crops.
SCENES, SIZE, BATCH = 16, 32, 4


def write_dataset(root: Path) -> Path:
    """Synthetic SEN12MS-CR triplets and their cloud probability under `root` (written once; returns root)."""
    from crrf_jax.data import cloudprob, sen12mscr, synthetic

    if not (root / "ready").exists():
        synthetic.write_synthetic_dataset(root, n_scenes=SCENES, size=SIZE, seed=0)
        cloudprob.compute_cloud_probs(root, sen12mscr.find_triplets(root, "all"), workers=0, progress=False)
        (root / "ready").touch()
    return root


# The stage runs of the tiny demo job (test_train's). The other runs of the tiny model on SEN12MS-CR train their
# stages with these settings too (test_remote_workdir the autoencoders and the flow, test_resume and test_train's
# NaN run the S1 autoencoder): the same programs, compiled once per session.
STAGE_RUNS = {
    "vae_s2": dict(steps=12, lr=2e-3),
    "vae_s1": dict(steps=12, lr=2e-3, checkpoint_every=4),
    "flow": dict(steps=30, lr=1e-3),
    "refiner": dict(steps=16, lr=3e-3),
}
VAE_S1 = STAGE_RUNS["vae_s1"]
WARMUP = 2


def stage_flags(stage: str, *, steps: int, lr: float, checkpoint_every: int | None = None,
                preview_every: int = 0) -> list[str]:
    """Flags of one stage: `steps` steps of batch 4, a metrics line every step, previews every `preview_every`
    steps (0: none)."""
    every = checkpoint_every or steps
    return [
        f"--config.{stage}.steps={steps}",
        f"--config.{stage}.batch_size={BATCH}",
        f"--config.{stage}.lr={lr}",
        f"--config.{stage}.warmup_steps={WARMUP}",
        f"--config.{stage}.log_every=1",
        f"--config.{stage}.preview_every={preview_every}",
        f"--config.{stage}.checkpoint_every={every}",
    ]


def base_flags(data_root: Path, workdir: Path, stage: str = "") -> list[str]:
    """The demo config (tiny model) on the synthetic data at `data_root`, without the demo's tail."""
    return [
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.demo=False",
        f"--config.data.root={data_root}",
        f"--config.data.crop_size={SIZE}",
        "--config.data.worker_count=0",
        f"--config.stage={stage}",
    ]


def cache_dir() -> Path:
    """The persistent compilation cache of the test session (tests/conftest.py puts it in the environment)."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


def test_env(**extra: str) -> dict[str, str]:
    """Environment of a train.py subprocess: CPU, one device, the session's compilation cache (every program
    cached, however quickly it compiled: a cache read takes milliseconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "CRRF_TEST_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir()),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(ROOT),
        XLA_FLAGS=CHEAP_XLA_FLAGS,
    )
    env.update(extra)
    return env


def start_train(flags: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Starts train.py (with the test hooks) in the repository root; stdout and stderr go to temporary files
    (not pipes, so that concurrent runs never block on a full pipe)."""
    return start_python(["-m", "tests.helpers.train_hooks", *flags], env)


def start_python(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Starts `python <args>` (a script or -m module of the repository) like `start_train`."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=err)
    proc.logs = (out, err)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Waits for a started train.py; returns the completed process (returncode, stdout, stderr as text)."""
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    texts = []
    for f in proc.logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    if timed_out:
        raise AssertionError(f"{' '.join(proc.args[1:3])} timed out after {timeout} s:\n{texts[1][-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, *texts)


def run_train(flags: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs train.py to the end; returns the completed process."""
    return finish(start_train(flags, env), timeout)


def run_concurrently(runs: dict, timeout: float = 300, start=start_train):
    """Runs independent train.py processes at once (or `start_python` ones): {name: (flags or args, env)} ->
    {name: completed process}."""
    procs = {name: start(flags, env) for name, (flags, env) in runs.items()}
    return {name: finish(proc, timeout) for name, proc in procs.items()}


def distributed_env(processes: int, **extra: str) -> list[dict[str, str]]:
    """The environments of `processes` processes that join one jax.distributed job on 127.0.0.1."""
    coordinator = f"127.0.0.1:{free_port()}"
    return [test_env(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(processes),
                     JAX_PROCESS_ID=str(i), **extra) for i in range(processes)]


def read_trace(path: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: entry}."""
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {e["step"]: e for e in entries}


def losses(path: Path) -> np.ndarray:
    """The logged losses of a metrics.jsonl in step order (steps must be 1..N without gaps)."""
    trace = read_trace(path)
    steps = sorted(trace)
    assert steps == list(range(1, len(steps) + 1)), f"{path}: steps {steps} are not 1..N"
    return np.array([trace[s]["loss"] for s in steps])


def read_checkpoint_state(step_dir: Path) -> dict:
    """The train-state arrays of one Orbax checkpoint step directory, as nested dicts of arrays on this
    process's first device (whatever mesh and process count saved them)."""
    import jax
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(step_dir / "state").item_metadata
        saved = getattr(saved, "tree", saved)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        return ckptr.restore(step_dir / "state", target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
