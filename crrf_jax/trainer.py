"""The stage loop: input, shard, step, checkpoint, log; and the run around it (data, stages, the demo's tail).

`run(config, workdir)` is what train.py calls. Each stage of `crrf_jax.stages` is trained by `train_stage`:
a per-process grain iterator turned into global arrays, a train state created directly in its shardings, one
jitted step with explicit shardings and donated buffers, Orbax checkpoints that resume exactly (model,
optimizer, EMA, data iterator), TensorBoard scalars, a metrics.jsonl trace, preview PNGs and a progress bar.
SIGTERM (preemption) saves a checkpoint and raises `Preempted`.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import signal
import time

import jax
import numpy as np

from crrf_jax import checkpoint, parallel, paths, rundir, stages, train_lib
from crrf_jax import config as C
from crrf_jax import visualize as vis
from crrf_jax.data import contract

log = logging.getLogger("crrf_jax.train")

PREVIEW_ROWS = 4


class Preempted(Exception):
    """Raised after SIGTERM once the checkpoint is saved."""


def run(config, workdir: str | os.PathLike) -> None:
    """The whole job (or the configured stage): demo data, stages, and the demo's evaluation tail."""
    C.validate(config)
    maybe_initialize_distributed(config)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
    paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
    prepare_data(config, workdir)
    rundir.save_run_config(config, workdir)
    stop = install_sigterm_handler()
    for name in C.stages_to_run(config):
        if name == "latent_stats":
            stages.measure_latent_stats(config, workdir, mesh, progress_range)
        else:
            train_stage(stages.make_stage(name, config, workdir), mesh, stop)
    if config.get("demo") and not config.stage:
        from crrf_jax import demo

        demo.finish(config, workdir)


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize() when config.distributed or JAX_COORDINATOR_ADDRESS is set
    (`parallel.initialize_distributed`)."""
    parallel.initialize_distributed(bool(config.distributed))


def prepare_data(config, workdir: str | os.PathLike) -> None:
    """Resolves the data root; the demo writes synthetic data of its dataset; the cached cloud statistics of
    the dataset are computed where missing: SEN12MS-CR's s2cloudless maps, SEN12MS-CR-TS's per-date coverage
    (its input-date choice). CUHK-CR and Sen2_MTC_New cache nothing: their R, G, B, NIR cloud score is computed
    on read (`cloudprob.rgbn_cloud_score`, a few arithmetic passes); their layout is checked here, so a wrong
    root fails before any stage starts."""
    from crrf_jax.data import cloudprob, sen12mscr, sources

    dataset = config.data.get("dataset", "sen12mscr")
    sources.dataset_info(dataset)  # a clear error for an unknown name
    if config.get("demo") and paths.is_url(workdir) and not (config.data.root and config.stage):
        raise ValueError(f"--workdir={workdir}: the demo writes its synthetic data and scene GeoTIFFs with rasterio, "
                         "which needs a local --workdir")
    if config.get("demo") and not config.data.root:
        config.data.root = os.fspath(rundir.demo_data_dir(workdir))
        if jax.process_index() == 0 and not _has_samples(config):
            log.info("writing %d synthetic %s samples to %s", config.data.synthetic_scenes, dataset, config.data.root)
            write_demo_data(config)
    if dataset == "sen12mscr":
        if config.data.source == "geotiff":
            triplets = sen12mscr.find_triplets(config.data.root, "all", config.data.protocol)  # clear error if empty
            if config.data.compute_cloud_prob and jax.process_index() == 0:
                cloudprob.compute_cloud_probs(config.data.root, triplets, workers=max(1, config.data.worker_count))
    elif dataset == "sen12mscr_ts":
        if config.data.compute_cloud_prob and jax.process_index() == 0:
            cloudprob.compute_ts_coverage(config.data.root, workers=max(1, config.data.worker_count))
    else:
        sources.open_source(config.data.source, root=config.data.root, split="train",
                             bands=config.data.bands or None, **sources.dataset_options(config.data))
    rundir.sync("data-ready")


def write_demo_data(config) -> None:
    """The demo's synthetic copy of `config.data.dataset` in its official layout under config.data.root:
    about `config.data.synthetic_scenes` samples of `synthetic_size` pixels over the dataset's splits."""
    from crrf_jax.data import cuhk_cr, sen2_mtc, sen12mscr_ts, synthetic

    d = config.data
    dataset, n, size = d.get("dataset", "sen12mscr"), int(d.synthetic_scenes), int(d.synthetic_size)
    if dataset == "sen12mscr":
        synthetic.write_synthetic_dataset(d.root, n_scenes=n, size=size, seed=0)
    elif dataset == "sen2_mtc_new":  # 4 tiles: 2 train, 1 val, 1 test
        tiles = sen2_mtc.DEFAULT_SYNTHETIC_TILES
        sen2_mtc.write_synthetic_sen2_mtc(d.root, tiles, images_per_tile=max(1, n // 4), size=size, seed=0)
    elif dataset in ("cuhk_cr1", "cuhk_cr2"):  # 3/4 train, 1/4 test, at twice the size if halved on read
        counts = {"train": max(1, n * 3 // 4), "test": max(1, n // 4)}
        cuhk_cr.write_synthetic_cuhk_cr(d.root, "CR" + dataset[-1], counts, size=size * int(d.get("downsample", 1)))
    elif dataset == "sen12mscr_ts":  # one train, one val, one test ROI; enough dates for the inputs and a target
        sen12mscr_ts.write_synthetic_sen12mscr_ts(d.root, n_patches=max(1, n // 3), n_dates=int(d.dates) + 3,
                                                  size=size, seed=0)
    else:
        raise ValueError(f"config.data.dataset={dataset!r} has no synthetic demo data")


def _has_samples(config) -> bool:
    from crrf_jax.data import sen12mscr, sources

    try:
        if config.data.get("dataset", "sen12mscr") == "sen12mscr":
            return bool(sen12mscr.find_triplets(config.data.root, "all"))
        return bool(len(sources.open_source("geotiff", root=config.data.root, split="train",
                                             bands=config.data.bands or None,
                                             **sources.dataset_options(config.data))))
    except (FileNotFoundError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------------------


def train_stage(stage: stages.TrainedStage, mesh, stop) -> None:
    """Trains `stage` to its configured steps (resuming from its newest checkpoint), then writes its final
    EMA weights for the next stages and the export."""
    stage_dir = rundir.stage_path(stage.workdir, stage.name)
    if rundir.stage_finished(stage_dir):
        log.info("%s: already finished (%s/final)", stage.name, stage_dir)
        return
    cfg = stage.cfg
    # --- Input and frozen networks; model, loss and optimizer.
    frozen = stage.frozen(mesh)
    per_process = stages.per_process_batch(cfg.batch_size, mesh, cfg.get("grad_accum", 1))
    data, preview_source = stage.input(per_process, frozen)
    tx = train_lib.make_optimizer(cfg)
    # --- Shard: the train state is created directly in its shardings.
    state = train_lib.init_train_state(stage.model_fn(), tx, mesh)
    state_shardings = train_lib.train_state_shardings(state, tx, mesh)
    log.info("%s: %s trainable parameters", stage.name, f"{_count(state.params):,}")
    # --- Checkpoint: resume from the newest restorable checkpoint (model and data iterator).
    ckpt = checkpoint.StageCheckpointer(rundir.checkpoints_dir(stage_dir), keep=cfg.keep_checkpoints)
    restored = ckpt.restore(state, data)
    start = 0
    if restored is not None:
        state, start = restored
        log.info("%s: resumed from step %d", stage.name, start)
    elif (seeded := stage.pretrained(state.params)) is not None:  # config.init: params and EMA; fresh optimizer
        ema = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), seeded)  # own buffers
        state = state.replace(params=seeded, ema=ema)
    # --- Step: one jit with explicit shardings; the state buffers are donated.
    step_fn = functools.partial(train_lib.train_step, loss_fn=stage.loss_fn(), tx=tx,
                                cfg=train_lib.StepConfig.from_config(cfg))
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen) if frozen is not None else None
    loop = _Loop(stage, mesh, stage_dir, start)
    try:
        state = loop.run(state, data, preview_source, frozen, ckpt, stop,
                         lambda batch_shardings: train_lib.compile_step(
                             step_fn, state_shardings, batch_shardings, frozen_shardings, mesh))
    finally:
        loop.close()
        ckpt.close()
    rundir.save_final(stage_dir, state)


class _Loop:
    """The steps of one stage, with what it logs: trace, TensorBoard, progress bar, previews."""

    def __init__(self, stage, mesh, stage_dir: str, start: int):
        self.stage, self.mesh, self.stage_dir, self.start = stage, mesh, stage_dir, start
        self.trace = MetricsTrace(rundir.metrics_path(stage_dir), start)
        self.writer = _summary_writer(rundir.tensorboard_dir(stage_dir))
        self.bar = progress_bar(stage.name, stage.cfg.steps, start)
        self.flops = None

    def run(self, state, data, preview_source, frozen, ckpt, stop, jit_step):
        cfg = self.stage.cfg
        base_rng = jax.random.key(self.stage.config.seed + 1000 * self.stage.index)
        batch_shardings = compiled = preview = None
        t_last, since = time.perf_counter(), 0
        for step in range(self.start, cfg.steps):
            local = next(data)
            if compiled is None:
                batch_shardings = {k: parallel.batch_sharding(self.mesh, np.ndim(v)) for k, v in _arrays(local).items()}
                batch = _global_batch(local, batch_shardings)
                compiled = jit_step(batch_shardings).lower(state, batch, base_rng, frozen).compile()
                self.flops = self.stage.flops(compiled)
                preview = _host_rows(local if preview_source is None else next(preview_source))
            else:
                batch = _global_batch(local, batch_shardings)
            state, metrics = compiled(state, batch, jax.random.fold_in(base_rng, step), frozen)
            done, since = step + 1, since + 1
            logging_step = done % cfg.log_every == 0 or done == cfg.steps
            if logging_step:
                dt, t_last = (time.perf_counter() - t_last) / since, time.perf_counter()
                self.log(done, jax.device_get(metrics), dt)
                since = 0
            stopping = stop()
            saving = stopping or done % cfg.checkpoint_every == 0 or done == cfg.steps  # each step saved once
            if saving or logging_step:  # where the host syncs anyway; a halted state is never checkpointed
                train_lib.check_finite(state, cfg.max_bad_steps)
            if cfg.preview_every and (done % cfg.preview_every == 0 or done == cfg.steps):
                self.write_preview(state, preview, frozen, done)
            if saving:
                ckpt.save(done, state, data, force=True)
            self.bar.update(1)
            if stopping:
                raise Preempted
        return state

    def log(self, done: int, metrics: dict, dt: float) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(step_time_s=dt, samples_per_s=self.stage.cfg.batch_size / dt)
        mfu = _mfu(self.flops, dt, self.stage.config.peak_tflops)
        if mfu is not None:
            metrics["mfu"] = mfu
        self.trace.write(done, metrics)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, done)
            self.writer.flush()
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    def write_preview(self, state, batch: dict, frozen, step: int) -> None:
        """A PNG grid (and TensorBoard image) of the preview images: inputs, outputs and target."""
        rows, cols = self.stage.preview(state.model(use_ema=True), batch, frozen, step)
        image = vis.grid(rows, col_labels=cols)
        if jax.process_index() == 0:
            vis.save_png(image, rundir.preview_path(self.stage_dir, step))
            if self.writer is not None:
                self.writer.add_image(f"{self.stage.name}/preview", image, step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _host_rows(local: dict) -> dict[str, np.ndarray]:
    """The first PREVIEW_ROWS images of the global batch whose part on this process is `local`, the same host
    arrays on every process (gathered across processes), so all compute the same preview; normalised to the
    float32 contract on the host (the preview draws them)."""
    return contract.normalize_batch(parallel.gather_rows(_arrays(local), PREVIEW_ROWS), np)


def _arrays(batch: dict) -> dict[str, np.ndarray]:
    """The numeric entries of a batch (ids and other strings stay on the host)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"}


def _global_batch(local: dict, shardings: dict) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in _arrays(local).items()}


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------------


class MetricsTrace:
    """metrics.jsonl of one stage (process 0); on resume, entries past the restored step are dropped.

    A local trace is appended to line by line. Object stores (a gs:// workdir) cannot append: there the trace
    is kept in memory and the whole file is rewritten at each write.
    """

    def __init__(self, path: str | os.PathLike, start_step: int):
        self.path = paths.as_path(path)
        self.enabled = jax.process_index() == 0
        self.lines: list[str] = []
        if not self.enabled:
            return
        if self.path.exists():
            self.lines = [line + "\n" for line in self.path.read_text().splitlines()
                          if line.strip() and json.loads(line)["step"] <= start_step]
        paths.write_text(self.path, "".join(self.lines))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        self.lines.append(line)
        if paths.is_url(self.path):
            paths.write_text(self.path, "".join(self.lines))
        else:
            with self.path.open("a") as f:
                f.write(line)


def _summary_writer(path: str | os.PathLike):
    """tensorboardX's writer (process 0); in an object store through `_RemoteEventFile`."""
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter, record_writer

    for prefix in paths.URL_PREFIXES:  # gs://, s3://, ...: through epath rather than tensorboardX's own clients
        record_writer.register_writer_factory(prefix.removesuffix("://"), _RemoteEventFiles())
    return SummaryWriter(os.fspath(path))


class _RemoteEventFile:
    """A TensorBoard event file in an object store, written through epath: object stores cannot append, so the
    records are kept in memory and the whole file is uploaded at each flush (as tensorboardX's GCS writer does;
    the memory grows with the run's scalars and preview images)."""

    def __init__(self, path: str):
        self.path, self.buffer = paths.as_path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        paths.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _RemoteEventFiles:
    """tensorboardX's writer factory for a URL prefix (`record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _RemoteEventFile:
        return _RemoteEventFile(path)

    def directory_check(self, path: str) -> None:
        paths.as_path(path).mkdir(parents=True, exist_ok=True)


def progress_bar(stage: str, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=stage, disable=jax.process_index() != 0, dynamic_ncols=True,
                smoothing=0.1)


def progress_range(desc: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=desc, disable=jax.process_index() != 0, dynamic_ncols=True)


# Dense (no 2:4 sparsity) bf16 peak TFLOP/s per device, by jax device_kind substring; the first key found in
# the kind wins, so the PCIe / NVL parts come before their SXM names. H100 and H200: NVIDIA's H100 and H200
# Tensor Core GPU datasheets list BF16 Tensor Core 1,979 TFLOPS for SXM (H100 "80GB HBM3", H200), 1,513 for
# H100 PCIe and 1,671 for the NVL boards, all "with sparsity": dense is half. A100: its datasheet's 312.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H200": 989.0, "H100": 989.0,
               "A100": 312.0, "L4": 121.0, "v5p": 459.0, "v5 lite": 197.0, "v5e": 197.0, "v4": 275.0,
               "v6": 918.0}


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


def install_sigterm_handler():
    """SIGTERM sets a flag the loop checks after each step (save, then exit 0); returns the flag's reader."""
    flag = {"stop": False}

    def handler(signum, frame):
        del signum, frame
        flag["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    return lambda: flag["stop"]
