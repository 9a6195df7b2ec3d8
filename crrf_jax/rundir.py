"""The run directory (train.py's --workdir): the one place that knows where a training run keeps what.

    <workdir>/config.json                      the training config, written at start (`save_run_config`)
    <workdir>/<stage>/                         one folder per stage (`stage_path`): vae_s2, vae_s1, flow,
                                               refiner, each with
        final/weights                          its EMA weights and non-trainable state {"ema", "rest"} (Orbax)
        final/DONE                             written last, holds the final step (`save_final`)
        checkpoints/ metrics.jsonl tb/ previews/   resumable state and logs (`checkpoints_dir`,
                                               `metrics_path`, `tensorboard_dir`, `preview_path`)
    <workdir>/latent_stats/latent_stats.json   latent scale and shift of each VAE (`latent_stats_path`)
    <workdir>/flow/latents/p<process>/         the flow stage's latent cache (`latent_cache_dir`; local
                                               scratch when the workdir is a URL)
    <workdir>/eval_<split>/                    evaluation outputs (`eval_dir`; also beside a bundle)
    <workdir>/data/ bundle/ scene/             the demo's synthetic data, bundle and scene prediction

The workdir may be a local folder or a URL (`gs://bucket/run`): every path here is an `etils.epath.Path` made
by `crrf_jax.paths.as_path` (local paths absolute, URLs kept as given) and every file is read and written through
it. `read_workdir` reads a finished run into crrf_jax.bundle.ModelParts, the form the export and
`CloudRemover.from_workdir` take it in. Problems are reported as bundle.BundleError naming the file.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from etils import epath

from crrf_jax import bundle, paths
from crrf_jax.bundle import BundleError

RUN_CONFIG_FILE = "config.json"


# ------------------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------------------


def run_config_path(workdir: str | os.PathLike) -> epath.Path:
    return paths.as_path(workdir) / RUN_CONFIG_FILE


def stage_path(workdir: str | os.PathLike, stage: str) -> epath.Path:
    return paths.as_path(workdir) / stage


def checkpoints_dir(stage_dir: str | os.PathLike) -> epath.Path:
    return paths.as_path(stage_dir) / "checkpoints"


def metrics_path(stage_dir: str | os.PathLike) -> epath.Path:
    return paths.as_path(stage_dir) / "metrics.jsonl"


def tensorboard_dir(stage_dir: str | os.PathLike) -> epath.Path:
    return paths.as_path(stage_dir) / "tb"


def preview_path(stage_dir: str | os.PathLike, step: int) -> epath.Path:
    return paths.as_path(stage_dir) / "previews" / f"{step:07d}.png"


def demo_data_dir(workdir: str | os.PathLike) -> epath.Path:
    """Where the demo writes its synthetic SEN12MS-CR scenes (when config.data.root is empty)."""
    return paths.as_path(workdir) / "data"


def bundle_dir(workdir: str | os.PathLike) -> epath.Path:
    """Where the demo exports its bundle."""
    return paths.as_path(workdir) / "bundle"


def scene_dir(workdir: str | os.PathLike) -> epath.Path:
    """The demo's tiled scene prediction (s1/s2/s2_cloudy, prediction, uncertainty, scene.png)."""
    return paths.as_path(workdir) / "scene"


def latent_stats_path(workdir: str | os.PathLike) -> epath.Path:
    return paths.as_path(workdir) / "latent_stats" / "latent_stats.json"


def latent_cache_dir(workdir: str | os.PathLike) -> epath.Path:
    """This process's shard of the flow stage's latent cache (crrf_jax.latent_cache), a local folder.

    The cache is memory-mapped, which needs local files: for a URL workdir (gs://bucket/run) it goes to
    `<temp dir>/crrf_jax_latents/<bucket>/<run>/p<process>` on each host ($TMPDIR picks the disk), rebuilt
    where missing.
    """
    if paths.is_url(workdir):
        import tempfile

        scheme, _, rest = os.fspath(workdir).partition("://")
        scratch = paths.as_path(tempfile.gettempdir()) / "crrf_jax_latents" / scheme / rest.strip("/")
        return scratch / f"p{jax.process_index()}"
    return paths.as_path(workdir) / "flow" / "latents" / f"p{jax.process_index()}"


def eval_dir(base: str | os.PathLike, split: str) -> epath.Path:
    """Where eval.py writes its results for `split` by default, in a workdir or a bundle directory."""
    return paths.as_path(base) / f"eval_{split}"


# ------------------------------------------------------------------------------------------------------------
# The run config
# ------------------------------------------------------------------------------------------------------------


def save_run_config(config, workdir: str | os.PathLike) -> epath.Path:
    """Writes the training config as `<workdir>/config.json` (process 0 only); returns the path."""
    path = run_config_path(workdir)
    if jax.process_index() == 0:
        paths.write_text(path, config.to_json_best_effort(indent=2) + "\n")
    return path


def load_run_config(workdir: str | os.PathLike):
    """The training config saved by `save_run_config`, as an ml_collections.ConfigDict."""
    import ml_collections

    path = run_config_path(workdir)
    if not path.is_file():
        raise BundleError(
            f"{path}: training config missing (train.py writes it at start). For an older run pass the "
            "config: `python -m crrf_jax.export --config=configs/<the one you trained with>.py ...`"
        )
    return ml_collections.ConfigDict(bundle.read_json(path))


# ------------------------------------------------------------------------------------------------------------
# A stage's final weights
# ------------------------------------------------------------------------------------------------------------


def stage_finished(stage_dir: str | os.PathLike) -> bool:
    """Whether a stage folder holds its final weights (final/DONE is written last)."""
    return (paths.as_path(stage_dir) / "final" / "DONE").exists()


def save_final(stage_dir: str | os.PathLike, state) -> None:
    """Writes a train state's EMA weights and non-trainable state into `<stage_dir>/final`, then DONE.

    Every process takes part (Orbax writes the shards of each); DONE comes from process 0.
    """
    import orbax.checkpoint as ocp

    path = paths.as_path(stage_dir) / "final"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "weights", {"ema": state.ema, "rest": state.rest}, force=True)
    if jax.process_index() == 0:
        paths.write_text(path / "DONE", f"{int(state.step)}\n")
    sync(f"final-{stage_dir}")


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process): what process 0 wrote is there for all."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_latent_stats(workdir: str | os.PathLike, names=("vae_s2", "vae_s1")) -> dict[str, dict[str, float]]:
    """The measured latent scale and shift of the autoencoders `names` (BundleError naming the file if
    missing)."""
    return bundle.read_latent_stats(latent_stats_path(workdir), names)


def write_latent_stats(workdir: str | os.PathLike, stats: dict) -> None:
    """Writes the latent statistics (process 0), then waits for every process."""
    import json

    if jax.process_index() == 0:
        paths.write_text(latent_stats_path(workdir), json.dumps(stats, indent=2))
    sync("latent-stats")


def restore_final(stage_dir: str | os.PathLike, model):
    """(graphdef, ema, rest) of a finished stage folder, shaped like `model`.

    `model` is built from the run's config, concrete or abstract (nnx.eval_shape): only its structure,
    shapes and dtypes are used. Raises BundleError naming the file when the stage is not finished or its
    weights do not fit `model`.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    stage = paths.as_path(stage_dir)  # Orbax wants absolute paths (or URLs)
    done, weights = stage / "final" / "DONE", stage / "final" / "weights"
    if not done.is_file():
        raise BundleError(f"{done}: stage {stage.name} not finished (no final/DONE); train it first")
    if not weights.is_dir():
        raise BundleError(f"{weights}: EMA weights of stage {stage.name} missing")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # One process: whole on its first device, whatever mesh and process count saved them. Several: every
    # process reads its copy alike (the topology must then be the one that saved them).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if jax.process_count() == 1 else None
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          {"ema": params, "rest": rest})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            loaded = ckptr.restore(weights, target)
    except Exception as e:  # noqa: BLE001 - any failure means the files do not hold this model
        raise BundleError(
            f"{weights}: cannot restore the {stage.name} weights ({type(e).__name__}: {e})"
        ) from e
    return graphdef, loaded["ema"], loaded["rest"]


def load_final(stage_dir: str | os.PathLike, model):
    """`model` with the EMA weights of a finished stage folder (see `restore_final`)."""
    from flax import nnx

    return nnx.merge(*restore_final(stage_dir, model))


# ------------------------------------------------------------------------------------------------------------
# A finished run as model parts
# ------------------------------------------------------------------------------------------------------------


def read_workdir(workdir: str | os.PathLike, config=None) -> bundle.ModelParts:
    """The EMA weights and latent statistics of a finished training run (all its stages done).

    config: the training config; default `<workdir>/config.json`. Raises BundleError naming the missing file.
    """
    workdir = paths.as_path(workdir)
    if not workdir.is_dir():
        raise BundleError(f"{workdir}: workdir does not exist")
    run_config = load_run_config(workdir) if config is None else config
    cfg = bundle.bundle_config(run_config)
    vaes = [name for name in bundle.networks(cfg) if name.startswith("vae")]
    stats = bundle.read_latent_stats(latent_stats_path(workdir), vaes)
    states = {}
    for name in bundle.networks(cfg):
        _, ema, rest = restore_final(stage_path(workdir, name), bundle.abstract_network(cfg, name))
        states[name] = bundle.flatten_state(ema) | bundle.flatten_state(rest)
    for name in vaes:  # the stage saved its VAE before the statistics were measured
        for key, value in stats[name].items():
            states[name][key] = np.asarray(value, np.float32)
    return bundle.ModelParts(cfg, states, stats, str(workdir))
