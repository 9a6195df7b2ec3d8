"""`python -m tests.helpers.train_hooks <train.py flags>`: train.py with test-only hooks from the environment.

CRRF_TEST_KILL_AFTER_SAVE=N   SIGKILL this process right after the (asynchronous) save of step N has started,
                              so that checkpoint N is left partial on disk.
CRRF_TEST_SIGTERM_AT_STEP=N   send SIGTERM to this process once step N's metrics are logged (a preemption).
CRRF_TEST_TRACE_ALL=1         every process writes its own metrics trace, metrics.p<process index>.jsonl,
                              and its own preview grids, <stage dir>/preview_<step>.p<process index>.npy.
CRRF_TEST_NAN_FROM_STEP=N     from step N on (1-based) every floating-point batch array is NaN (bad data).
CRRF_TEST_FAKE_GCS=ROOT       gs://<bucket>/<key> is served offline from ROOT/<bucket>/<key> (tests.helpers.fake_gcs:
                              epath through a fake fsspec "gcs" filesystem, Orbax given the folder behind it).

The signals are real: the process receives them from the kernel exactly as from an outside sender; sending
them from inside only pins the step at which they arrive.
"""

from __future__ import annotations

import os
import signal


def install_hooks() -> None:
    import jax

    from crrf_jax import checkpoint, trainer

    fake_gcs = os.environ.get("CRRF_TEST_FAKE_GCS")
    if fake_gcs:
        from tests.helpers import fake_gcs as fake

        fake.install(fake_gcs)
        fake.orbax_in_folder(fake_gcs)

    kill_after = os.environ.get("CRRF_TEST_KILL_AFTER_SAVE")
    if kill_after:
        save = checkpoint.StageCheckpointer.save

        def save_then_die(self, step, *args, **kwargs):
            started = save(self, step, *args, **kwargs)
            if int(step) == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)
            return started

        checkpoint.StageCheckpointer.save = save_then_die

    nan_from = os.environ.get("CRRF_TEST_NAN_FROM_STEP")
    if nan_from:
        import numpy as np

        global_batch, calls = trainer._global_batch, [0]

        def poisoned(local, shardings):
            calls[0] += 1
            if calls[0] >= int(nan_from):
                local = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v
                         for k, v in local.items()}
            return global_batch(local, shardings)

        trainer._global_batch = poisoned

    sigterm_at = os.environ.get("CRRF_TEST_SIGTERM_AT_STEP")
    trace_all = os.environ.get("CRRF_TEST_TRACE_ALL") == "1"
    if sigterm_at or trace_all:
        base = trainer.MetricsTrace

        class HookedTrace(base):
            def __init__(self, path, start_step: int):
                path = os.fspath(path)
                if trace_all:
                    path = path.replace(".jsonl", f".p{jax.process_index()}.jsonl")
                super().__init__(path, start_step)
                if trace_all and not self.enabled:  # other processes keep their own trace too
                    self.enabled = True
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "w").close()

            def write(self, step: int, metrics: dict) -> None:
                super().write(step, metrics)
                if sigterm_at and step == int(sigterm_at):
                    os.kill(os.getpid(), signal.SIGTERM)

        trainer.MetricsTrace = HookedTrace
    if trace_all:
        _record_previews()


def _record_previews() -> None:
    """Every process saves the preview grid it computed (only process 0 writes the PNG)."""
    import jax
    import numpy as np

    from crrf_jax import trainer
    from crrf_jax import visualize as vis

    write_preview = trainer._Loop.write_preview

    def recorded(self, state, batch, frozen, step):
        preview = self.stage.preview

        def preview_and_save(*args):
            rows, cols = preview(*args)
            path = os.path.join(self.stage_dir, f"preview_{step}.p{jax.process_index()}.npy")
            np.save(path, vis.grid(rows, col_labels=cols))
            return rows, cols

        self.stage.preview = preview_and_save
        try:
            write_preview(self, state, batch, frozen, step)
        finally:
            del self.stage.preview

    trainer._Loop.write_preview = recorded


def main() -> None:
    install_hooks()
    import train

    train.cli()


if __name__ == "__main__":
    main()
