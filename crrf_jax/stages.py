"""The stages of a training run, one small class each: model, loss, frozen networks, input, preview, FLOPs.

The trainer (crrf_jax/trainer.py) runs any `TrainedStage` with the same loop; adding a stage adds a class here
and its name to `crrf_jax.config.STAGES`. `LatentStats` is the one stage that trains nothing: it measures the
autoencoders' latent scale and shift on training data.

    stage = make_stage("flow", config, workdir)
    stage.model_fn()          -> a fresh nnx.Module (built inside jit, directly in its shardings)
    stage.pretrained(params)  -> the fresh params seeded from config.init's checkpoint, or None
    stage.loss_fn()           -> loss(model, batch, rng, frozen) -> (loss, aux)
    stage.frozen(mesh)        -> the trained networks the loss reads (None, or replicated over the mesh)
    stage.input(batch_size)   -> (training iterator, preview iterator or None)
    stage.preview(...)        -> (rows of RGB panels, column labels)
    stage.flops(compiled)     -> FLOPs of one step per device (for MFU), or None
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crrf_jax import config as C
from crrf_jax import flow as rf
from crrf_jax import parallel, rundir, sampling, temporal, train_lib
from crrf_jax import visualize as vis
from crrf_jax.data import contract
from crrf_jax.models import build, pretrained

log = logging.getLogger("crrf_jax.train")


def make_input(config, split: str, batch_size: int, *, seed: int, train: bool = True, crop_size: int = 0,
               shard: tuple[int, int] | None = None):
    """The grain iterator of `split` for this process (shuffled, augmented and repeated when `train`).

    Training crops are `crop_size` pixels, or `config.data.crop_size` when it is 0. `shard` (index, count)
    reads another process's shard (default: this process's, jax.process_index() of jax.process_count()).
    """
    from crrf_jax.data import pipeline, sources

    d = config.data
    process_index, process_count = shard or (None, None)
    dataset = pipeline.make_dataset(
        source=d.source, root=d.root, data_dir=d.tfds_data_dir or None, split=split, protocol=d.protocol,
        bands=contract.resolve_bands(d.bands), batch_size=batch_size,
        crop_size=(crop_size or d.crop_size) if train else None, augment=train, shuffle=train,
        num_epochs=None if train else 1, drop_remainder=train, seed=seed, worker_count=d.worker_count,
        read_threads=d.get("read_threads"),
        on_error=d.on_error, process_index=process_index, process_count=process_count,
        cache=train and d.get("cache", False), **sources.dataset_options(d),
    )
    return iter(dataset)


def rgb_indices(config) -> tuple[int, int, int]:
    return contract.rgb_channels(config.data.bands)


def per_process_batch(global_batch: int, mesh, grad_accum: int = 1) -> int:
    """This process's share of a global batch; an error unless each of its `grad_accum` micro-batches splits
    evenly over the data-parallel shards and the processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % (grad_accum * shards) or global_batch % (grad_accum * jax.process_count()):
        raise ValueError(
            f"batch_size {global_batch} must divide evenly into grad_accum={grad_accum} micro-batches over "
            f"the {shards} data-parallel shards and {jax.process_count()} processes"
        )
    return global_batch // jax.process_count()


# --------------------------------------------------------------------------------------------------------------
# Trained stages
# --------------------------------------------------------------------------------------------------------------


class TrainedStage:
    """A stage trained by the trainer's loop; subclasses say what is trained and how."""

    def __init__(self, name: str, config, workdir: str):
        self.name, self.config, self.workdir = name, config, workdir
        self.cfg = config[name]  # the stage's optimisation section (steps, lr, batch_size, ...)

    @property
    def index(self) -> int:
        return C.STAGES.index(self.name)

    def model_fn(self):
        raise NotImplementedError

    def loss_fn(self):
        raise NotImplementedError

    def pretrained(self, params):
        """`params` (the fresh train state's nnx.Params) seeded from the pretrained checkpoint of
        config.init.<stage>, placed in their shardings; None where none is configured (the default)."""
        del params

    def frozen(self, mesh):
        return None

    def input(self, batch_size: int, frozen=None):
        """(training batches, preview batches or None: the preview then uses the first training batch)."""
        data = make_input(self.config, "train", batch_size, seed=self.config.seed + self.index,
                          crop_size=C.stage_crop(self.config, self.name))
        return data, None

    def preview(self, model, batch: dict, frozen, step: int):
        raise NotImplementedError

    def flops(self, compiled) -> float | None:
        """FLOPs of one step per device as counted by XLA (None where the backend does not say)."""
        try:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            return float(cost["flops"]) if cost and cost.get("flops") else None
        except Exception:  # noqa: BLE001 - cost analysis is best effort
            return None


class AutoencoderStage(TrainedStage):
    """The Sentinel-2 (`vae_s2`) or Sentinel-1 (`vae_s1`) autoencoder: L1 + KL (+ spectral angle)."""

    @property
    def key(self) -> str:
        return "s2" if self.name == "vae_s2" else "s1"

    def model_fn(self):
        return functools.partial(build.autoencoder, self.config.model, self.name, self.config.dtype,
                                 self.config.seed)

    def pretrained(self, params):
        cfg = self.config.model[self.name].to_dict()
        bands = contract.resolve_bands(self.config.data.bands) if self.key == "s2" else None  # None: S1
        return seed_params(self.name, "init." + self.name, self.config.init[self.name], params,
                           lambda sd, shapes, source: pretrained.seed_autoencoder(sd, cfg, shapes, bands, source))

    def loss_fn(self):
        cfg = train_lib.VaeLossConfig(self.key, self.cfg.kl_weight, self.cfg.sam_weight)
        return functools.partial(train_lib.vae_loss, cfg=cfg)

    def preview(self, model, batch, frozen, step):
        images = np.asarray(batch[self.key])
        batch = {self.key: images[:, 0] if images.ndim == 5 else images}  # a multi-temporal batch: date 1
        recon = sampling.vae_roundtrip_jit(*nnx.split(model), jnp.asarray(batch[self.key]))
        recon = np.clip(parallel.to_host(recon), 0, 1)
        rgb = rgb_indices(self.config)
        show = (lambda x: vis.s2_rgb(x, rgb)) if self.key == "s2" else vis.sar_rgb
        return [[show(batch[self.key][i]), show(recon[i])] for i in range(len(recon))], ["input", "reconstruction"]


class _SamplingStage(TrainedStage):
    """Shared by the stages whose previews sample the cloud-free image (flow, refiner)."""

    def sample(self, nets: dict, batch: dict, step: int, output: str) -> np.ndarray:
        f = self.config.flow
        mean, _ = sampling.predict_batch(
            **nets, batch={k: jnp.asarray(v) for k, v in batch.items()}, rng=jax.random.key(step),
            steps=f.sample_steps, guidance_scale=f.guidance_scale, spec=rf.FlowSpec.from_config(f), output=output,
        )
        return parallel.to_host(mean)

    def panels(self, batch: dict, outputs: dict):
        """One row per sample: every cloudy date, the SAR (of the first date) where the data has it, the
        outputs, the target."""
        rgb = rgb_indices(self.config)
        cloudy = np.asarray(batch["s2_cloudy"])
        dates = cloudy.shape[1] if cloudy.ndim == 5 else 0
        sar = None if "s1" not in batch else np.asarray(batch["s1"])
        sar = sar[:, 0] if sar is not None and dates else sar

        def row(i):
            inputs = [vis.s2_rgb(x, rgb) for x in (cloudy[i] if dates else cloudy[i : i + 1])]
            inputs += [] if sar is None else [vis.sar_rgb(sar[i])]
            return inputs + [vis.s2_rgb(p[i], rgb) for p in outputs.values()] + [vis.s2_rgb(batch["s2"][i], rgb)]

        names = [f"cloudy t{k + 1}" for k in range(dates)] if dates else ["cloudy"]
        return [row(i) for i in range(len(batch["s2"]))], [*names, *(["SAR"] if sar is not None else []),
                                                           *outputs, "target"]


class FlowStage(_SamplingStage):
    """The rectified-flow transformer on the frozen VAEs' latents (optionally cached once)."""

    def model_fn(self):
        c = self.config
        return functools.partial(build.cloud_removal_flux, c.model, c.dtype, c.remat_policy, c.seed)

    def pretrained(self, params):
        return seed_params(self.name, "init.flux", self.config.init.flux, params, pretrained.seed_flux)

    def loss_fn(self):
        return functools.partial(train_lib.flow_loss, cfg=train_lib.FlowLossConfig.from_config(self.cfg))

    def frozen(self, mesh):
        return jax.device_put(sampling.Networks.of_vaes(*trained_vaes(self.config, self.workdir)),
                              parallel.replicated(mesh))

    def input(self, batch_size, frozen=None):
        data, _ = super().input(batch_size)
        if not self.cfg.cache_latents:
            return data, None
        from crrf_jax import latent_cache  # encode the training set once; train on latents

        cache = latent_cache.build(
            rundir.latent_cache_dir(self.workdir),
            make_input(self.config, "train", batch_size, seed=self.config.seed, train=False), frozen,
        )
        latents = latent_cache.iterator(cache, batch_size=batch_size, crop_size=self.config.data.crop_size,
                                        seed=self.config.seed + self.index)
        return latents, data  # pixel batches for the preview pictures

    def preview(self, model, batch, frozen, step):
        nets = dict(flow_model=model, vae_s2=frozen.vae_s2(), vae_s1=frozen.vae_s1(), refiner=None)
        return self.panels(batch, {"flow": self.sample(nets, batch, step, "flow")})

    def flops(self, compiled):
        """The transformer analytically: XLA's count of the step counts the scanned blocks' body once. Model
        FLOPs, without the frozen VAE encoders."""
        c = self.config
        n = (c.data.crop_size // 16) ** 2  # tokens per stream: latent = crop / 8, 2x2 patches
        dates = int(c.model.get("max_dates", 1))  # noisy + one cloudy stream a date; one SAR stream a date
        per_sample = train_lib.flux_train_flops(c.model.flux, n_img=(1 + dates) * n, n_txt=dates * n)
        return per_sample * c.flow.batch_size / jax.device_count()


class RefinerStage(_SamplingStage):
    """The pixel-space refiner on the frozen flow's sampled predictions (or the cloudy VAE round trip)."""

    def model_fn(self):
        return functools.partial(build.refiner, self.config.model, self.config.dtype, self.config.seed)

    def loss_fn(self):
        return functools.partial(train_lib.refiner_loss, cfg=train_lib.RefinerLossConfig.from_config(self.config))

    def frozen(self, mesh):
        c = self.config
        flow = trained(self.workdir, "flow", lambda: build.cloud_removal_flux(c.model, c.dtype, c.remat_policy))
        nets = sampling.Networks.of(flow, *trained_vaes(c, self.workdir))
        return jax.device_put(nets, parallel.replicated(mesh))

    def preview(self, model, batch, frozen, step):
        nets = dict(flow_model=frozen.flow(), vae_s2=frozen.vae_s2(), vae_s1=frozen.vae_s1(), refiner=model)
        outputs = {"flow": self.sample(nets, batch, step, "flow"), "refined": self.sample(nets, batch, step, "final")}
        return self.panels(batch, outputs)


def seed_params(stage: str, key: str, path: str, params, seed):
    """`params` with the values `seed(state_dict, shapes, source)` returns (crrf_jax.models.pretrained) from
    the checkpoint at `path` (config `key`) placed in their shardings; None when `path` is empty. The report is
    logged."""
    if not path:
        return None
    shapes = {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(params)}
    log.info("%s: reading pretrained weights from %s", stage, path)
    values, report = seed(pretrained.read_checkpoint(path), shapes, f"{path} (config.{key})")
    log.info("%s: %s", stage, report)
    return parallel.place_like(params, values)


TRAINED = {"vae_s2": AutoencoderStage, "vae_s1": AutoencoderStage, "flow": FlowStage, "refiner": RefinerStage}


def make_stage(name: str, config, workdir: str) -> TrainedStage:
    return TRAINED[name](name, config, workdir)


# --------------------------------------------------------------------------------------------------------------
# Latent statistics and the trained autoencoders
# --------------------------------------------------------------------------------------------------------------


def trained(workdir: str, stage: str, model_fn):
    """The module `model_fn()` builds, with the EMA weights of the finished `stage` of `workdir`. The module is
    built abstractly (shapes only): no random initialisation whose values the restore would overwrite."""
    return rundir.load_final(rundir.stage_path(workdir, stage), nnx.eval_shape(model_fn))


def trained_vaes(config, workdir: str) -> list:
    """The trained (S2, S1) autoencoders with their measured latent statistics (S1 None without SAR)."""
    stats = rundir.read_latent_stats(workdir, C.autoencoders(config.model))
    vaes = [None, None]
    for i, stage in enumerate(C.autoencoders(config.model)):
        vae = trained(workdir, stage, functools.partial(build.autoencoder, config.model, stage, config.dtype))
        vae.set_latent_stats(stats[stage]["scale_factor"], stats[stage]["shift_factor"])
        vaes[i] = vae
    return vaes


def measure_latent_stats(config, workdir: str, mesh, progress) -> dict:
    """Scale and shift of each autoencoder's latents measured on training data (written once, then read).

    Each process measures the moments of its own data shard (`shard_moments`); they are combined over all
    processes (`all_processes`), so the statistics are those of every process's batches together.
    """
    if rundir.latent_stats_path(workdir).exists():
        return rundir.read_latent_stats(workdir, C.autoencoders(config.model))
    batch_size = per_process_batch(config.latent_stats.batch_size, mesh)
    stats = {}
    for stage, m in shard_moments(config, workdir, batch_size, progress).items():
        m = all_processes(m)
        scale, shift = m.scale_shift()
        stats[stage] = {"scale_factor": scale, "shift_factor": shift, "values": m.n}
    log.info("latent statistics: %s", stats)
    rundir.write_latent_stats(workdir, stats)
    return stats


def shard_moments(config, workdir: str, batch_size: int, progress=None,
                  shard: tuple[int, int] | None = None) -> dict[str, train_lib.LatentMoments]:
    """Moments of each trained autoencoder's posterior means on one process's shard of the training data:
    `config.latent_stats.batches` batches of `batch_size`; `shard` (index, count) defaults to this process's.
    A computation on this process alone (its own devices)."""
    vaes = {stage: trained(workdir, stage, functools.partial(build.autoencoder, config.model, stage, config.dtype))
            for stage in C.autoencoders(config.model)}
    batches = config.latent_stats.batches
    data = make_input(config, "train", batch_size, seed=config.seed, shard=shard)
    moments = {stage: train_lib.LatentMoments() for stage in vaes}

    keys = {"vae_s2": "s2", "vae_s1": "s1"}

    @jax.jit
    def posterior_means(batch):  # every date of a multi-temporal S1 batch is one more image
        batch = contract.normalize_batch(batch)
        return {stage: vae.encode_posterior(contract.to_model(temporal.flatten_dates(batch[keys[stage]]))).mean
                for stage, vae in vaes.items()}

    for _ in progress("latent_stats", batches) if progress else range(batches):
        local = next(data)
        wanted = [keys[s] for s in vaes] + [contract.FLIP_ROTATE]  # the images as augmented
        for stage, z in posterior_means({k: jnp.asarray(local[k]) for k in wanted if k in local}).items():
            moments[stage].update(z)
    return moments


def all_processes(moments: train_lib.LatentMoments) -> train_lib.LatentMoments:
    """The moments of every process's values together: each process's (n, mean, M2) gathered (float64) and
    merged in process order, so every process gets the same result."""
    total = train_lib.LatentMoments()
    for n, mean, m2 in parallel.allgather_float64([moments.n, moments.mean, moments.m2]):
        total.merge(int(n), float(mean), float(m2))
    return total
