"""Trains crrf-jax: the S2 and S1 autoencoders, their latent statistics, the rectified-flow transformer, then
the pixel-space refiner.

    python train.py --config=configs/demo.py --workdir=runs/demo                 # synthetic data, CPU, minutes
    python train.py --config=configs/sen12mscr.py --config.data.root=DATA --workdir=runs/base
    python train.py --config=configs/sen12mscr.py:variant=base,stage=flow --config.flow.lr=5e-5 ...

Without a stage every stage runs in order; each resumes on its own from `<workdir>/<stage>/checkpoints`, and a
finished stage leaves its EMA weights in `<workdir>/<stage>/final` for the next. SIGTERM (preemption) saves a
checkpoint and exits 0. Logs: TensorBoard in `<workdir>/<stage>/tb`, a JSON-lines trace in
`<workdir>/<stage>/metrics.jsonl`, preview PNGs in `<workdir>/<stage>/previews`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from configs import common
from crrf_jax import bundle, checkpoint, parallel, rundir, sampling, train_lib
from crrf_jax import flow as rf
from crrf_jax import visualize as vis
from crrf_jax.data import contract, sen12mscr
from crrf_jax.models import build

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config file (with :args).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of configuration and data errors.")

log = logging.getLogger("crrf_jax.train")


class Preempted(Exception):
    """Raised after SIGTERM once the checkpoint is saved."""


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
    setup_logging()
    try:
        run(config, workdir)
    except Preempted:
        log.info("preempted: checkpoint saved, exiting cleanly")
        sys.exit(0)
    except (ValueError, FileNotFoundError, NotADirectoryError, train_lib.NonFiniteError) as err:
        # Bad configuration or data: the message names the key or file; the traceback adds nothing for users.
        if _TRACEBACK.value:
            raise
        sys.exit(f"error: {err}\n(rerun with --traceback for the full traceback)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a --config.<key> naming no config field into a one-line error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        sys.exit(f"FATAL flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as err:  # ml_collections raises these for an unknown override key
        message = err
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]
        message = str(message)
        key = message.splitlines()[0].strip("'\"")
        culprits = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
        if not culprits:  # not an override's fault (e.g. a bug in the config file): the traceback helps
            raise
        hint = "".join(f"\n{line}" for line in message.splitlines()[1:])
        sys.exit(f"error: {culprits[0]}: the config has no field {key!r}{hint}")


def cli() -> None:
    app.run(main, flags_parser=parse_flags)


def setup_logging() -> None:
    """Our INFO messages on stderr; libraries (Orbax, grain, absl) only from WARNING up."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("crrf_jax")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def run(config, workdir: str) -> None:
    """The whole job (or the configured stage): demo data, stages, and the demo's evaluation tail."""
    validate(config)
    maybe_initialize_distributed(config)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    prepare_data(config, workdir)
    rundir.save_run_config(config, workdir)
    stop = _install_sigterm_handler()
    stages = [config.stage] if config.stage else list(common.STAGES)
    if not bundle.has_refiner(config.model):
        stages = [s for s in stages if s != "refiner"]
    for stage in stages:
        if stage == "latent_stats":
            measure_latent_stats(config, workdir, mesh)
        else:
            train_stage(config, workdir, stage, mesh, stop)
    if config.get("demo") and not config.stage:
        from crrf_jax import demo

        demo.finish(config, workdir)


def validate(config) -> None:
    """Clear errors for config values that would otherwise fail deep inside."""
    if config.stage and config.stage not in common.STAGES:
        raise ValueError(f"config.stage={config.stage!r}: choose one of {common.STAGES} or '' for all")
    if config.data.source not in ("geotiff", "tfds"):
        raise ValueError(f"config.data.source={config.data.source!r}: choose 'geotiff' or 'tfds'")
    if config.data.protocol not in ("exact", "legacy"):
        raise ValueError(f"config.data.protocol={config.data.protocol!r}: choose 'exact' or 'legacy'")
    if config.data.crop_size % 16:
        raise ValueError(f"config.data.crop_size={config.data.crop_size} must be a multiple of 16")
    for stage in ("vae_s2", "vae_s1"):
        crop = _stage_crop(config, stage)
        if crop % 16 or crop > config.data.crop_size:
            raise ValueError(f"config.{stage}.crop_size={crop} must be a multiple of 16 and at most "
                             f"config.data.crop_size={config.data.crop_size}")
    if config.stage == "refiner" and not bundle.has_refiner(config.model):
        raise ValueError("config.stage='refiner' but config.model.refiner.enabled is False")
    rf.FlowSpec.from_config(config.flow)  # clear error for a bad flow.source / source_sigma
    if config.refiner.input not in ("flow", "roundtrip"):
        raise ValueError(f"config.refiner.input={config.refiner.input!r}: choose 'flow' or 'roundtrip'")
    build.compute_dtype(config.dtype)
    if not config.get("demo") and not config.data.root and not config.data.tfds_data_dir:
        raise ValueError("no data: set --config.data.root=/path/to/SEN12MSCR (the official layout)")


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize() when config.distributed or JAX_COORDINATOR_ADDRESS is set.

    The coordinator address, process count and process id come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID where set (GPU clusters, CPU tests); on TPU pods and SLURM JAX finds
    them itself. CPU processes talk through gloo collectives.
    """
    if not (config.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if os.environ.get(env):
            try:
                kwargs[key] = int(os.environ[env])
            except ValueError:
                raise ValueError(f"{env}={os.environ[env]!r} in the environment is not an integer") from None
    jax.distributed.initialize(os.environ.get("JAX_COORDINATOR_ADDRESS") or None, **kwargs)


def prepare_data(config, workdir: str) -> None:
    """Resolves the data root; the demo writes synthetic scenes; missing cloud probabilities are computed."""
    from crrf_jax.data import cloudprob, synthetic

    if config.get("demo") and not config.data.root:
        config.data.root = os.path.join(workdir, "data")
        if jax.process_index() == 0 and not _has_triplets(config.data.root):
            log.info("writing %d synthetic scenes to %s", config.data.synthetic_scenes, config.data.root)
            synthetic.write_synthetic_dataset(
                config.data.root, n_scenes=config.data.synthetic_scenes, size=config.data.synthetic_size, seed=0
            )
    if config.data.source == "geotiff":
        triplets = sen12mscr.find_triplets(config.data.root, "all", config.data.protocol)  # clear error if empty
        if config.data.compute_cloud_prob and jax.process_index() == 0:
            cloudprob.compute_cloud_probs(config.data.root, triplets, workers=max(1, config.data.worker_count))
    _sync("data-ready")


def _has_triplets(root: str) -> bool:
    try:
        return bool(sen12mscr.find_triplets(root, "all"))
    except (FileNotFoundError, ValueError):
        return False


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------------------


def train_stage(config, workdir: str, stage: str, mesh, stop) -> None:
    scfg = config[stage]
    stage_dir = os.path.join(workdir, stage)
    if rundir.stage_finished(stage_dir):
        log.info("%s: already finished (%s/final)", stage, stage_dir)
        return

    # --- Input: a per-process grain iterator, turned into global arrays sharded over ('data', 'fsdp').
    batch_size = _per_process_batch(scfg.batch_size, mesh)
    data = make_input(config, "train", batch_size, seed=config.seed + _stage_index(stage),
                      crop_size=_stage_crop(config, stage))
    batch_shardings = None  # built from the first batch's shapes
    preview_source = None  # where preview pictures come from, when not from the training batches

    # --- Model and loss: a pure loss function of (model, batch, rng, frozen).
    tx = train_lib.make_optimizer(scfg)
    if stage in ("vae_s2", "vae_s1"):
        model_fn = functools.partial(build.autoencoder, config.model, stage, config.dtype, config.seed)
        loss_cfg = train_lib.VaeLossConfig("s2" if stage == "vae_s2" else "s1", scfg.kl_weight, scfg.sam_weight)
        loss_fn = functools.partial(train_lib.vae_loss, cfg=loss_cfg)
        frozen = None
    elif stage == "refiner":
        model_fn = functools.partial(build.refiner, config.model, config.dtype, config.seed)
        loss_fn = functools.partial(train_lib.refiner_loss, cfg=train_lib.RefinerLossConfig.from_config(config))
        frozen = load_frozen_networks(config, workdir, mesh)
    else:
        model_fn = functools.partial(
            build.cloud_removal_flux, config.model, config.dtype, config.remat_policy, config.seed
        )
        loss_fn = functools.partial(train_lib.flow_loss, cfg=train_lib.FlowLossConfig.from_config(scfg))
        frozen = load_frozen_vaes(config, workdir, mesh)
        if scfg.cache_latents:  # encode the training set once; train on latents (see crrf_jax/latent_cache.py)
            from crrf_jax import latent_cache

            cache = latent_cache.build(
                rundir.latent_cache_dir(workdir),
                make_input(config, "train", batch_size, seed=config.seed, train=False),
                frozen,
            )
            preview_source = data  # pixel batches for the preview pictures
            data = latent_cache.iterator(cache, batch_size=batch_size, crop_size=config.data.crop_size,
                                         seed=config.seed + _stage_index(stage))

    # --- Shard: the train state is created directly in its shardings.
    state = train_lib.init_train_state(model_fn, tx, mesh)
    state_shardings = train_lib.train_state_shardings(state, tx, mesh)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen) if frozen is not None else None
    log.info("%s: %s trainable parameters", stage, f"{_count(state.params):,}")

    # --- Checkpoint: resume from the newest restorable checkpoint (model and data iterator).
    ckpt = checkpoint.StageCheckpointer(os.path.join(stage_dir, "checkpoints"), keep=scfg.keep_checkpoints)
    restored = ckpt.restore(state, data)
    start = 0
    if restored is not None:
        state, start = restored
        log.info("%s: resumed from step %d", stage, start)
    trace = MetricsTrace(os.path.join(stage_dir, "metrics.jsonl"), start)

    # --- Step: one jit with explicit shardings; the state buffers are donated.
    step_fn = functools.partial(train_lib.train_step, loss_fn=loss_fn, tx=tx, ema_decay=scfg.ema_decay)
    base_rng = jax.random.key(config.seed + 1000 * _stage_index(stage))
    writer = _summary_writer(os.path.join(stage_dir, "tb"))
    schedule = train_lib.lr_schedule(scfg)
    preview_batch = None
    compiled = None
    flops = None
    bar = _progress(stage, scfg.steps, start)
    t_last, steps_since = time.perf_counter(), 0

    # --- Loop.
    for step in range(start, scfg.steps):
        local = next(data)
        if batch_shardings is None:
            batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in _arrays(local).items()}
        batch = _global_batch(local, batch_shardings)
        if compiled is None:
            jitted = train_lib.compile_step(step_fn, state_shardings, batch_shardings, frozen_shardings, mesh)
            compiled = jitted.lower(state, batch, base_rng, frozen).compile()
            flops = _step_flops(compiled, config, stage)
        if preview_batch is None:
            preview_batch = batch if preview_source is None else _arrays(next(preview_source))
        state, metrics = compiled(state, batch, jax.random.fold_in(base_rng, step), frozen)
        steps_since += 1
        done = step + 1
        if done % scfg.log_every == 0 or done == scfg.steps:
            metrics = jax.device_get(metrics)
            train_lib.check_finite(state.opt_state, scfg.max_bad_steps)
            dt = (time.perf_counter() - t_last) / steps_since
            t_last, steps_since = time.perf_counter(), 0
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics.update(lr=float(schedule(step)), step_time_s=dt, samples_per_s=scfg.batch_size / dt)
            mfu = _mfu(flops, dt, config.peak_tflops)
            if mfu is not None:
                metrics["mfu"] = mfu
            trace.write(done, metrics)
            _write_scalars(writer, done, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if scfg.preview_every and (done % scfg.preview_every == 0 or done == scfg.steps):
            write_preview(config, stage, stage_dir, state, preview_batch, frozen, done, writer)
        saved = done % scfg.checkpoint_every == 0 or done == scfg.steps
        if saved:
            ckpt.save(done, state, data, force=True)
        bar.update(1)
        if stop():
            if not saved:  # a step is saved once (Orbax refuses a second save of the same step)
                ckpt.save(done, state, data, force=True)
            ckpt.close()
            bar.close()
            raise Preempted
    bar.close()
    ckpt.close()
    rundir.save_final(stage_dir, state)
    if writer is not None:
        writer.close()


def _stage_crop(config, stage: str) -> int:
    """A stage's training crop: `config.<stage>.crop_size` where set (the autoencoders, which are fully
    convolutional, may learn on smaller crops), else `config.data.crop_size`."""
    return int(config[stage].get("crop_size", 0) or config.data.crop_size)


def _stage_index(stage: str) -> int:
    return common.STAGES.index(stage)


def _per_process_batch(global_batch: int, mesh) -> int:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards or global_batch % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch} must divide evenly over the {shards} data-parallel shards and "
            f"{jax.process_count()} processes"
        )
    return global_batch // jax.process_count()


def _arrays(batch: dict) -> dict[str, np.ndarray]:
    """The numeric entries of a batch (ids and other strings stay on the host)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"}


def _global_batch(local: dict, shardings: dict) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in _arrays(local).items()
    }


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------------------


def make_input(config, split: str, batch_size: int, *, seed: int, train: bool = True, crop_size: int = 0):
    """The grain iterator of `split` for this process (shuffled, augmented and repeated when `train`).

    Training crops are `crop_size` pixels, or `config.data.crop_size` when it is 0.
    """
    from crrf_jax.data import pipeline

    d = config.data
    dataset = pipeline.make_dataset(
        source=d.source,
        root=d.root,
        data_dir=d.tfds_data_dir or None,
        split=split,
        protocol=d.protocol,
        bands=contract.resolve_bands(d.bands),
        batch_size=batch_size,
        crop_size=(crop_size or d.crop_size) if train else None,
        augment=train,
        shuffle=train,
        num_epochs=None if train else 1,
        drop_remainder=train,
        seed=seed,
        worker_count=d.worker_count,
        on_error=d.on_error,
    )
    return iter(dataset)


# --------------------------------------------------------------------------------------------------------------
# Stage outputs: EMA weights for the next stage, latent statistics
# --------------------------------------------------------------------------------------------------------------


def measure_latent_stats(config, workdir: str, mesh) -> dict:
    """Scale and shift of each VAE's latents measured on training data (DESIGN section 4)."""
    path = rundir.latent_stats_path(workdir)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    vaes = {
        stage: rundir.load_final(os.path.join(workdir, stage), build.autoencoder(config.model, stage, config.dtype))
        for stage in ("vae_s2", "vae_s1")
    }
    cfg = config.latent_stats
    data = make_input(config, "train", _per_process_batch(cfg.batch_size, mesh), seed=config.seed, train=True)
    moments = {stage: train_lib.LatentMoments() for stage in vaes}

    @jax.jit
    def posterior_means(batch):
        return {
            "vae_s2": vaes["vae_s2"].encode_posterior(contract.to_model(batch["s2"])).mean,
            "vae_s1": vaes["vae_s1"].encode_posterior(contract.to_model(batch["s1"])).mean,
        }

    for _ in _progress("latent_stats", cfg.batches, 0, iterate=True):
        local = next(data)
        means = posterior_means({k: jnp.asarray(local[k]) for k in ("s2", "s1")})
        for stage, z in means.items():
            moments[stage].update(z)
    stats = {}
    for stage, m in moments.items():
        scale, shift = m.scale_shift()
        stats[stage] = {"scale_factor": scale, "shift_factor": shift, "values": m.n}
    log.info("latent statistics: %s", stats)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(stats, f, indent=2)
    _sync("latent-stats")
    return stats


def _trained_vaes(config, workdir: str) -> list:
    """The trained (S2, S1) VAEs with their measured latent statistics."""
    path = rundir.latent_stats_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: latent statistics missing; run the latent_stats stage first")
    with open(path) as f:
        stats = json.load(f)
    vaes = []
    for stage in ("vae_s2", "vae_s1"):
        vae = rundir.load_final(os.path.join(workdir, stage), build.autoencoder(config.model, stage, config.dtype))
        vae.set_latent_stats(stats[stage]["scale_factor"], stats[stage]["shift_factor"])
        vaes.append(vae)
    return vaes


def load_frozen_vaes(config, workdir: str, mesh) -> sampling.Networks:
    """The trained VAEs with measured latent statistics, replicated over the mesh (the flow stage's)."""
    return jax.device_put(sampling.Networks.of_vaes(*_trained_vaes(config, workdir)), parallel.replicated(mesh))


def load_frozen_networks(config, workdir: str, mesh) -> sampling.Networks:
    """The trained flow model (EMA) and VAEs, replicated over the mesh (the refiner stage's)."""
    flow = rundir.load_final(
        os.path.join(workdir, "flow"), build.cloud_removal_flux(config.model, config.dtype, config.remat_policy)
    )
    nets = sampling.Networks.of(flow, *_trained_vaes(config, workdir))
    return jax.device_put(nets, parallel.replicated(mesh))


# --------------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------------


class MetricsTrace:
    """metrics.jsonl of one stage; on resume, entries past the restored step are dropped."""

    def __init__(self, path: str, start_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def _summary_writer(path: str):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(path)


def _write_scalars(writer, step: int, metrics: dict) -> None:
    if writer is None:
        return
    for k, v in metrics.items():
        writer.add_scalar(f"train/{k}", v, step)
    writer.flush()


def _progress(stage: str, total: int, initial: int, iterate: bool = False):
    from tqdm.auto import tqdm

    disable = jax.process_index() != 0
    if iterate:
        return tqdm(range(total), desc=stage, disable=disable, dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc=stage, disable=disable, dynamic_ncols=True, smoothing=0.1)


def _step_flops(compiled, config, stage: str) -> float | None:
    """FLOPs of one train step per device. XLA's count of the compiled (partitioned) step is per device, but
    counts the body of a scanned loop once, so the flow stage (scanned transformer blocks) counts the
    transformer analytically instead: model FLOPs, without the frozen VAE encoders."""
    if stage != "flow":
        return _flops(compiled)
    n = (config.data.crop_size // 16) ** 2  # tokens per stream: latent = crop / 8, 2x2 patches
    per_sample = train_lib.flux_train_flops(config.model.flux, n_img=2 * n, n_txt=n)
    return per_sample * config.flow.batch_size / jax.device_count()


def _flops(compiled) -> float | None:
    """FLOPs of one compiled step per device as counted by XLA (None where the backend does not say)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return None


# Dense bf16 peak TFLOP/s per device by jax device_kind substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "v5p": 459.0, "v5 lite": 197.0,
               "v5e": 197.0, "v4": 275.0, "v6": 918.0}


def _mfu(flops: float | None, step_time: float, peak_tflops: float) -> float | None:
    """Model FLOPs utilisation from the FLOPs of one step per device and the peak of one device."""
    if not flops:
        return None
    peak = peak_tflops
    if not peak:
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), 0.0)
    if not peak:
        return None
    return flops / step_time / (peak * 1e12)


def write_preview(config, stage, stage_dir, state, batch, frozen, step, writer) -> None:
    """A PNG grid (and TensorBoard image) of the first preview images: inputs, output and target."""
    model = state.model(use_ema=True)
    rgb = _rgb_indices(config)
    n = min(4, batch["s2"].shape[0])
    host = {k: np.asarray(jax.device_get(v))[:n] for k, v in batch.items()}
    if stage in ("flow", "refiner"):
        if stage == "flow":
            nets = dict(flow_model=model, vae_s2=frozen.vae_s2(), vae_s1=frozen.vae_s1(), refiner=None)
        else:
            nets = dict(flow_model=frozen.flow(), vae_s2=frozen.vae_s2(), vae_s1=frozen.vae_s1(), refiner=model)

        def predict(output):
            mean, _ = sampling.predict_batch(
                **nets, batch={k: jnp.asarray(v) for k, v in host.items()}, rng=jax.random.key(step),
                steps=config.flow.sample_steps, guidance_scale=config.flow.guidance_scale,
                spec=rf.FlowSpec.from_config(config.flow), output=output,
            )
            return np.asarray(mean)

        outputs = {"flow": predict("flow")} | ({"refined": predict("final")} if stage == "refiner" else {})
        rows = [[vis.s2_rgb(host["s2_cloudy"][i], rgb), vis.sar_rgb(host["s1"][i])]
                + [vis.s2_rgb(p[i], rgb) for p in outputs.values()] + [vis.s2_rgb(host["s2"][i], rgb)]
                for i in range(n)]
        cols = ["cloudy", "SAR", *outputs, "target"]
    else:
        key = "s2" if stage == "vae_s2" else "s1"
        recon = np.asarray(_vae_roundtrip(*nnx.split(model), jnp.asarray(host[key])))
        recon = np.clip(contract.from_model(recon), 0, 1)
        show = (lambda x: vis.s2_rgb(x, rgb)) if key == "s2" else vis.sar_rgb
        rows = [[show(host[key][i]), show(recon[i])] for i in range(n)]
        cols = ["input", "reconstruction"]
    image = vis.grid(rows, col_labels=cols)
    if jax.process_index() == 0:
        vis.save_png(image, os.path.join(stage_dir, "previews", f"{step:07d}.png"))
        if writer is not None:
            writer.add_image(f"{stage}/preview", image, step, dataformats="HWC")


@functools.partial(jax.jit, static_argnums=0)
def _vae_roundtrip(graphdef, state, x):
    """decode(encode(x)) of an autoencoder split into (graphdef, state): compiled once per stage, not per
    preview (a closure over the module would embed its weights and compile anew each time)."""
    vae = nnx.merge(graphdef, state)
    return vae.decode(vae.encode(contract.to_model(x)))


def _rgb_indices(config) -> tuple[int, int, int]:
    bands = contract.resolve_bands(config.data.bands)
    return contract.rgb_channels(bands)


def _install_sigterm_handler():
    """SIGTERM sets a flag the loop checks after each step (save, then exit 0)."""
    flag = {"stop": False}

    def handler(signum, frame):
        del signum, frame
        flag["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    return lambda: flag["stop"]


if __name__ == "__main__":
    cli()
