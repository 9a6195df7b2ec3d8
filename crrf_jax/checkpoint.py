"""Orbax checkpoints of one training stage: train state, data-iterator state, async saves, keep-N, resume.

Layout: `<workdir>/<stage>/checkpoints/<step>/{state, data}`; the directory is an etils.epath.Path, local or
gs://, which Orbax handles itself (the data iterator's state is one JSON file per process, written by grain's
handler through epath). Saves are asynchronous (the next steps run while the arrays are written) and atomic
(locally Orbax writes into a temporary directory and renames it when complete; on GCS it marks a complete step
with a commit file), so an interrupted save never looks complete. On resume the newest checkpoint that restores
is used; one that fails to restore (corrupt files) is skipped with a warning and the next older one is tried.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from crrf_jax import paths

log = logging.getLogger(__name__)


class StageCheckpointer:
    """An Orbax CheckpointManager for one stage's TrainState and (optionally) its grain iterator."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = paths.as_path(directory)  # epath: a local folder (absolute) or a gs:// URL
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        )
        self._unrestorable: set[int] = set()  # steps `restore` skipped; a new save of that step replaces them

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether a save was started.

        A checkpoint of the same step that `restore` found unusable is deleted first (Orbax refuses to save a
        step that exists; a run resumed from an older checkpoint reaches that step again).
        """
        if int(step) in self._unrestorable:
            log.warning("replacing the unrestorable checkpoint %s/%d", self.directory, step)
            self.manager.delete(int(step))
            self._unrestorable.discard(int(step))
        items = {"state": ocp.args.StandardSave(_savable(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, data_iterator=None) -> tuple[Any, int] | None:
        """Restores the newest restorable checkpoint into the shardings of `abstract_state`.

        `abstract_state` is a TrainState of jax.ShapeDtypeStruct leaves carrying shardings (or concrete arrays,
        whose shardings are used). The data iterator, when given, is restored in place. Returns (state, step),
        or None when no checkpoint exists or none restores (the iterator then keeps its initial state).
        """
        target = jax.tree.map(_abstract, _savable(abstract_state))
        # A failed attempt may have restored the iterator already: start from scratch if every attempt fails.
        initial = data_iterator.get_state() if data_iterator is not None else None
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                log.warning("checkpoint %s/%d could not be restored (%s: %s); trying an older one",
                            self.directory, step, type(e).__name__, e)
                self._unrestorable.add(step)
                continue
            return abstract_state.replace(**restored["state"]), step
        if initial is not None and self._unrestorable:
            data_iterator.set_state(initial)
        return None


    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _savable(state) -> dict[str, Any]:
    """The array-valued fields of a TrainState (its graphdef is rebuilt from the config, not saved)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "ema": state.ema,
            "rest": state.rest, "updates": state.updates, "guard": state.guard}


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
