"""Train state, optimizer, EMA and the pure train steps of the three stages (VAE S2, VAE S1, flow).

A model is split once into `graphdef` (static structure) and its `nnx.State`; the train step is a pure
function of `(TrainState, batch, rng)` that merges the graph inside, so it jits with explicit shardings and
donated buffers (see `compile_step`). Frozen networks (a `sampling.Networks`: the VAEs during the flow stage) travel as a
separate argument and get no gradients.

Batches hold the data contract (`crrf_jax.data.contract`: values in [0, 1]); models see `contract.to_model(x)`
(x * 2 - 1) and their images come back through `contract.from_model`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from crrf_jax import flow as rf  # noqa
from crrf_jax import sampling, temporal
from crrf_jax.data import contract

Batch = dict[str, jax.Array]


# --------------------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------------------


@struct.dataclass
class Guard:
    """The non-finite guard's counters, on device: `consecutive` and `total` skipped (non-finite) steps, and
    `halted_at`, the step count at which `max_bad_steps` consecutive skips stopped training (0 = running)."""

    consecutive: jax.Array
    total: jax.Array
    halted_at: jax.Array

    @classmethod
    def create(cls) -> Guard:
        zero = jnp.zeros((), jnp.int32)
        return cls(zero, zero, zero)


@struct.dataclass
class TrainState:
    """Everything a step changes. `params` are the trainable nnx.Param leaves; `ema` their moving average;
    `updates` counts the optimizer updates applied (the schedule's clock)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    ema: nnx.State
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    rest: nnx.State = struct.field(default=None)  # non-trainable variables (e.g. latent statistics)
    updates: jax.Array = struct.field(default=None)
    guard: Guard = struct.field(default=None)

    def model(self, use_ema: bool = False) -> nnx.Module:
        """The module with the current (or EMA) parameters."""
        return nnx.merge(self.graphdef, self.ema if use_ema else self.params, self.rest)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule (`lr_schedule`) after global-norm gradient clipping.

    cfg fields: lr, warmup_steps, steps, min_lr_ratio, weight_decay, b1, b2, eps, grad_clip. Gradient
    accumulation and the non-finite guard are part of the step (`train_step`), so the schedule's clock is the
    number of applied updates, one per step.
    """
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8),
                    weight_decay=cfg.weight_decay),
    )


def lr_schedule(cfg) -> optax.Schedule:
    """Warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps` (in optimizer updates)."""
    steps = max(int(cfg.steps), 1)
    warmup = min(int(cfg.warmup_steps), steps - 1) if steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
    """Splits `model` into graph, trainable params and the rest, and initialises optimizer, EMA and guard."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params),
        graphdef=graphdef,
        rest=rest,
        updates=jnp.zeros((), jnp.int32),
        guard=Guard.create(),
    )


class NonFiniteError(RuntimeError):
    pass


def check_finite(state: TrainState, max_bad_steps: int) -> None:
    """Raises once the step's guard has halted training (`max_bad_steps` consecutive non-finite steps).

    One scalar read; the trainer calls it where it syncs anyway (logging, checkpoints). The weights stay as
    they were before the first of those steps: no non-finite update is ever applied."""
    halted_at = int(state.guard.halted_at)
    if halted_at:
        raise NonFiniteError(
            f"{max_bad_steps} consecutive steps had non-finite loss or gradients, the last at step {halted_at} "
            f"({int(state.guard.total)} in all); training stopped there and no non-finite update was applied. "
            "Lower the learning rate, enable gradient clipping, or check the data for NaN/Inf."
        )


# --------------------------------------------------------------------------------------------------------------
# Generic step
# --------------------------------------------------------------------------------------------------------------

LossFn = Callable[[nnx.Module, Batch, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a step needs besides the loss and the optimizer (one stage's config section)."""

    ema_decay: float = 0.999
    grad_accum: int = 1  # micro-batches per step: the batch is split, gradients averaged, one update
    max_bad_steps: int = 10  # consecutive non-finite steps that halt training
    schedule: optax.Schedule | None = None  # logged as `lr`: the rate of the update this step applied

    @classmethod
    def from_config(cls, cfg) -> StepConfig:
        return cls(float(cfg.ema_decay), int(cfg.get("grad_accum", 1)), int(cfg.max_bad_steps), lr_schedule(cfg))


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    frozen: Any,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step: loss and gradients (over `cfg.grad_accum` micro-batches), update, EMA. Pure.

    The guard runs on device: a step whose loss or gradients are not finite changes nothing but the guard's
    counters; after `max_bad_steps` consecutive ones the state is frozen (`guard.halted_at`) and every later
    step is a no-op until the host notices (`check_finite`). The batch may be compact (the pipelines' uint16
    DN and uint8 cloud probability): it becomes the float32 contract here, first
    (`contract.normalize_batch`)."""
    batch = contract.normalize_batch(batch)
    loss, aux, grads = _gradients(state, batch, rng, frozen, loss_fn, cfg.grad_accum)
    grad_norm = optax.global_norm(grads)
    guard = state.guard
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite & (guard.halted_at == 0)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p, state.ema, params)
    keep = functools.partial(_select, apply)
    consecutive = jnp.where(finite, 0, guard.consecutive + 1)
    halt = (guard.halted_at == 0) & (consecutive >= cfg.max_bad_steps) if cfg.max_bad_steps else False
    guard = Guard(
        consecutive=jnp.where(guard.halted_at == 0, consecutive, guard.consecutive),
        total=guard.total + jnp.where(guard.halted_at == 0, (~finite).astype(jnp.int32), 0),
        halted_at=jnp.where(halt, state.step + 1, guard.halted_at),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~apply).astype(jnp.float32), **aux}
    if cfg.schedule is not None:
        metrics["lr"] = jnp.asarray(cfg.schedule(state.updates), jnp.float32)
    new = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        ema=keep(ema, state.ema),
        updates=state.updates + apply.astype(jnp.int32),
        guard=guard,
    )
    return new, metrics


def _select(pred: jax.Array, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _gradients(state: TrainState, batch: Batch, rng: jax.Array, frozen, loss_fn: LossFn, micro_batches: int):
    """(loss, aux, grads), averaged over `micro_batches` equal parts of the batch, scanned one after another
    so only one part's activations are live. Part i takes rows i, i + k, i + 2k, ... (k = micro_batches), so
    a batch sharded over devices in contiguous blocks gives every device its share of every part."""

    def value_and_grad(micro: Batch, key: jax.Array):
        def objective(params):
            return loss_fn(nnx.merge(state.graphdef, params, state.rest), micro, key, frozen)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        return loss, aux, grads

    if micro_batches == 1:
        return value_and_grad(batch, rng)
    rows = {k: v.shape[0] for k, v in batch.items()}
    if any(n % micro_batches for n in rows.values()):
        raise ValueError(f"batch rows {rows} do not split into grad_accum={micro_batches} equal micro-batches")
    parts = {k: jnp.swapaxes(v.reshape(v.shape[0] // micro_batches, micro_batches, *v.shape[1:]), 0, 1)
             for k, v in batch.items()}

    def body(total, xs):
        micro, i = xs
        loss, aux, grads = value_and_grad(micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, total, (loss, aux, grads)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(value_and_grad, jax.tree.map(lambda v: v[0], parts), rng))
    total, _ = jax.lax.scan(body, zeros, (parts, jnp.arange(micro_batches)))
    return jax.tree.map(lambda x: x / micro_batches, total)


# --------------------------------------------------------------------------------------------------------------
# Stage losses
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VaeLossConfig:
    """VAE objective: L1 + kl_weight * KL + sam_weight * spectral angle (keeps band ratios, which L1 alone blurs)."""

    key: str  # batch key of the images: "s2" or "s1"
    kl_weight: float = 1e-6
    sam_weight: float = 0.0


def vae_loss(model, batch: Batch, rng: jax.Array, frozen, *, cfg: VaeLossConfig):
    """Loss of an AutoEncoder on `batch[cfg.key]` (B, [T,] H, W, C) in [0, 1] (dates are more images)."""
    del frozen
    x = contract.to_model(temporal.flatten_dates(batch[cfg.key]))
    recon, posterior = model(x, rng)
    recon = recon.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = jnp.mean(posterior.kl()) / x[0].size  # per pixel and band, so the weight does not depend on size
    loss = l1 + cfg.kl_weight * kl
    aux = {"l1": l1, "kl": kl}
    if cfg.sam_weight:
        sam = spectral_angle_loss(recon, x)
        loss = loss + cfg.sam_weight * sam
        aux["sam"] = sam
    return loss, aux


def spectral_angle_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean spectral angle (radians) between pixel vectors of (B, H, W, C) images (inputs in [-1, 1])."""
    p, t = contract.from_model(pred), contract.from_model(target)
    cos = jnp.sum(p * t, -1) / (jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(t, axis=-1) + eps)
    return jnp.mean(jnp.arccos(jnp.clip(cos, -1.0 + 1e-6, 1.0 - 1e-6)))


@dataclasses.dataclass(frozen=True)
class FlowLossConfig:
    t_sampling: str = "logit_normal"
    sar_dropout: float = 0.1
    cloudy_dropout: float = 0.1
    use_sar: bool = True
    pixel_loss_weight: float = 0.0  # > 0 adds the cloud-weighted L1 through the frozen S2 decoder
    joint_dropout: float = 0.0  # both conditions dropped together: the branch classifier-free guidance uses
    spec: rf.FlowSpec = rf.FlowSpec()  # the source distribution (noise or the cloudy latent)
    date_dropout: float = 0.0  # multi-temporal: each cloudy date absent with this probability (one always kept)

    @classmethod
    def from_config(cls, scfg) -> FlowLossConfig:
        """From a config's `flow` section (configs/common.py)."""
        return cls(
            scfg.t_sampling, scfg.sar_dropout, scfg.cloudy_dropout, scfg.use_sar, scfg.pixel_loss_weight,
            scfg.get("joint_dropout", 0.0), rf.FlowSpec.from_config(scfg), scfg.get("date_dropout", 0.0),
        )


def condition_dropout(rng: jax.Array, batch: int, cfg: FlowLossConfig) -> tuple[jax.Array, jax.Array]:
    """(drop_sar, drop_cloudy), each (batch,) bool: both together with probability `joint_dropout`, else each
    on its own with `sar_dropout` / `cloudy_dropout`. P(both) = joint + (1 - joint) * sar * cloudy."""
    r_joint, r_sar, r_cld = jax.random.split(rng, 3)
    both = jax.random.bernoulli(r_joint, cfg.joint_dropout, (batch,))
    drop_sar = both | jax.random.bernoulli(r_sar, cfg.sar_dropout, (batch,))
    drop_cloudy = both | jax.random.bernoulli(r_cld, cfg.cloudy_dropout, (batch,))
    return drop_sar, drop_cloudy


def encode_batch(vaes: sampling.Networks, batch: Batch, present: jax.Array | None = None) -> dict[str, jax.Array]:
    """Scaled latents (B, [T,] H/8, W/8, 16) of the target, the cloudy image(s) and the SAR image(s), without
    gradients. "sar" is left out when the batch has no `s1` (a dataset without SAR). A multi-temporal batch
    also gives "source": the latent of its least-cloudy composite over the `present` dates (the flow's
    source, `temporal`).

    `vaes`: the frozen networks (`sampling.Networks.of_vaes`; only the VAEs are used)."""
    s2_vae, encode = vaes.vae_s2(), sampling.encode
    out = {"x0": encode(s2_vae, batch["s2"]), "cloudy": encode(s2_vae, batch["s2_cloudy"])}
    if "s1" in batch:
        out["sar"] = encode(vaes.vae_s1(), batch["s1"])
    if temporal.is_multitemporal(batch["s2_cloudy"]):
        out["source"] = encode(s2_vae, temporal.composite(batch["s2_cloudy"], batch["cloud_prob"], present))
    return jax.tree.map(jax.lax.stop_gradient, out)


def flow_loss(model, batch: Batch, rng: jax.Array, vaes: sampling.Networks, *, cfg: FlowLossConfig):
    """Rectified-flow loss of CloudRemovalFlux on one batch. Latents come from the frozen VAEs, or from the
    batch itself when it carries cached latents ("x0", "cloudy", "sar"). With several cloudy dates, dates are
    dropped at random (`cfg.date_dropout`, never all of a sample's) and the flow starts from the composite of
    the dates kept."""
    b = batch["s2"].shape[0] if "s2" in batch else batch["x0"].shape[0]
    r_t, r_eps, r_drop = jax.random.split(rng, 3)
    cloudy = batch["cloudy"] if "x0" in batch else batch["s2_cloudy"]
    dates = cloudy.shape[1] if cloudy.ndim == 5 else 1
    present = temporal.date_dropout(jax.random.fold_in(rng, 3), b, dates, cfg.date_dropout)
    lat = {k: batch[k] for k in ("x0", "cloudy", "sar")} if "x0" in batch else encode_batch(vaes, batch, present)
    x0 = lat["x0"]
    t = rf.sample_t(r_t, b, kind=cfg.t_sampling)
    x1 = cfg.spec.start(jax.random.normal(r_eps, x0.shape, x0.dtype), lat.get("source", lat["cloudy"]))
    x_t = rf.interpolate(x0, x1, t)
    drop_sar, drop_cloudy = condition_dropout(r_drop, b, cfg)
    v = model(
        x_t,
        t,
        lat["cloudy"],
        lat.get("sar") if cfg.use_sar else None,
        batch["cloud_prob"],
        drop_sar=drop_sar,
        drop_cloudy=drop_cloudy,
        dates=present,
    ).astype(jnp.float32)
    loss = rf.flow_loss(v, rf.velocity_target(x0, x1))
    aux = {"flow_mse": loss}
    if cfg.pixel_loss_weight:
        x0_hat = rf.x0_from_velocity(x_t, t, v)
        pixels = contract.from_model(vaes.vae_s2().decode(x0_hat).astype(jnp.float32))
        _, cloud_prob, _ = temporal.single_view(batch["s2_cloudy"], batch["cloud_prob"], present=present)
        pix = rf.pixel_l1_loss(pixels, batch["s2"], cloud_prob)
        loss = loss + cfg.pixel_loss_weight * pix
        aux["pixel_l1"] = pix
    return loss, aux


@dataclasses.dataclass(frozen=True)
class RefinerLossConfig:
    """The refiner's objective: L1 + ssim_weight * (1 - SSIM) + sam_weight * spectral angle (radians) of the
    refined image against the clear target.

    input: what the refiner refines, "flow" (the frozen flow's sampled prediction, `flow_steps` Euler steps
    from fresh noise each step) or "roundtrip" (the cloudy image's VAE round trip: the ablation without the
    latent flow). sar_dropout: the share of samples trained in the SAR-absent mode (flow and refiner alike).
    date_dropout: with several cloudy dates, each date's chance of being absent for the sample (the flow
    stage's `flow.date_dropout`, one date always kept), so the refiner too serves any T up to max_dates.
    """

    ssim_weight: float = 0.5
    sam_weight: float = 0.0
    sar_dropout: float = 0.1
    input: str = "flow"
    flow_steps: int = 8
    spec: rf.FlowSpec = rf.FlowSpec()
    guidance_scale: float = 1.0
    date_dropout: float = 0.0

    @classmethod
    def from_config(cls, config) -> RefinerLossConfig:
        r, f = config.refiner, config.flow
        return cls(r.ssim_weight, r.get("sam_weight", 0.0), r.sar_dropout, r.input,
                   int(r.flow_steps or f.sample_steps), rf.FlowSpec.from_config(f), float(f.guidance_scale),
                   float(f.get("date_dropout", 0.0)))


def refiner_input(nets, batch: Batch, rng: jax.Array, drop_sar: jax.Array, cfg: RefinerLossConfig,
                  present: jax.Array | None = None) -> jax.Array:
    """What the refiner restores, (B, H, W, C) in [0, 1], without gradients: a flow sample or a round trip
    (of the dates `present`, (B, T) or None = all, for several dates)."""
    if cfg.input == "roundtrip":
        view = temporal.single_view(batch["s2_cloudy"], batch["cloud_prob"], present=present)[0]
        pred = sampling.vae_roundtrip(nets.vae_s2(), view)
    elif cfg.input == "flow":
        keys = jax.random.split(rng, batch["s2_cloudy"].shape[0])
        pred, _ = sampling.sample_patches(
            nets, batch["s2_cloudy"], batch.get("s1"), batch["cloud_prob"], keys, steps=cfg.flow_steps,
            guidance_scale=cfg.guidance_scale, spec=cfg.spec, output="flow", drop_sar=drop_sar, present=present,
        )
    else:
        raise ValueError(f"refiner input must be 'flow' or 'roundtrip', got {cfg.input!r}")
    return jax.lax.stop_gradient(jnp.clip(pred, 0.0, 1.0))


def refiner_loss(model, batch: Batch, rng: jax.Array, nets, *, cfg: RefinerLossConfig):
    """Loss of the Refiner on `batch` (pixels in [0, 1]); `nets` are the frozen sampling.Networks."""
    from crrf_jax import metrics

    r_drop, r_input = jax.random.split(rng)
    b, cloudy = batch["s2"].shape[0], batch["s2_cloudy"]
    drop_sar = jax.random.bernoulli(r_drop, cfg.sar_dropout, (b,))
    dates = cloudy.shape[1] if temporal.is_multitemporal(cloudy) else 1
    present = temporal.date_dropout(jax.random.fold_in(rng, 3), b, dates, cfg.date_dropout)
    pred = refiner_input(nets, batch, r_input, drop_sar, cfg, present)
    refined, trust = model(pred, cloudy, batch["cloud_prob"], batch.get("s1"), ~drop_sar, present)
    target = batch["s2"].astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(refined - target))
    ssim_map = functools.partial(metrics.ssim_map, blur=metrics.gaussian_blur_matmul)
    ssim = jnp.mean(jax.vmap(ssim_map)(refined, target))
    loss = l1 + cfg.ssim_weight * (1.0 - ssim)
    aux = {"l1": l1, "ssim": ssim, "input_l1": jnp.mean(jnp.abs(pred - target)), "trust": jnp.mean(trust)}
    if cfg.sam_weight:
        sam = spectral_angle_loss(contract.to_model(refined), contract.to_model(target))
        loss = loss + cfg.sam_weight * sam
        aux["sam"] = sam
    return loss, aux


# --------------------------------------------------------------------------------------------------------------
# Latent statistics
# --------------------------------------------------------------------------------------------------------------


class LatentMoments:
    """Running mean and variance of unscaled latent values over batches (Chan's parallel update, float64)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, z) -> None:
        import numpy as np

        z = np.asarray(z, np.float64).ravel()
        mean_b = float(z.mean())
        self.merge(z.size, mean_b, float(((z - mean_b) ** 2).sum()))

    def merge(self, n_b: int, mean_b: float, m2_b: float) -> None:
        """Adds the moments (count, mean, sum of squared deviations) of other values: Chan's pairwise merge,
        so batches, or the parts measured by several processes, combine into the moments of their union."""
        if n_b == 0:
            return
        delta = mean_b - self.mean
        n = self.n + n_b
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.n * n_b / n
        self.n = n

    def scale_shift(self) -> tuple[float, float]:
        """(scale_factor, shift_factor) that map latents to zero mean and unit variance."""
        if self.n < 2:
            raise ValueError("latent statistics need at least two latent values")
        std = (self.m2 / (self.n - 1)) ** 0.5
        return 1.0 / max(std, 1e-8), self.mean


# --------------------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------------------


def flux_train_flops(cfg, n_img: int, n_txt: int) -> float:
    """FLOPs of one training step (forward + backward) of the FLUX transformer on one sample.

    `cfg` has FluxParams fields (FluxConfig or mapping); n_img image-stream tokens (noisy target + cloudy),
    n_txt context tokens (SAR); L = n_img + n_txt. Forward, 2 FLOPs per multiply-add:
      embeddings    img_in over n_img, txt_in over n_txt, the per-sample MLPs of time (256 -> h -> h), vector
                    (vec_in_dim -> h -> h) and guidance (if any);
      double block  per stream: qkv h -> 3h, proj h -> h, MLP h -> m -> h over its tokens, modulation h -> 6h
                    per sample; joint attention 4 L^2 h (QK^T and AV);
      single block  linear1 h -> 3h + m and linear2 h + m -> h over L tokens, modulation h -> 3h per sample,
                    attention 4 L^2 h;
      final layer   adaLN h -> 2h per sample, linear h -> out_channels over n_img.
    Norms, RoPE, activations and the optimizer are left out (a few percent). Training = 3 x forward (the
    backward pass costs two forwards): 6 x matmul weights x their tokens + 12 L^2 h per block.
    XLA's cost analysis cannot replace this: it counts the body of the scanned blocks once.
    """
    from crrf_jax.models.flux import FluxConfig

    cfg = cfg if isinstance(cfg, FluxConfig) else FluxConfig.from_dict(cfg)
    h = cfg.hidden_size
    m, L = int(h * cfg.mlp_ratio), n_img + n_txt

    def mm(tokens, fan_in, fan_out):
        return 2.0 * tokens * fan_in * fan_out

    vectors = 2 if cfg.guidance_embed else 1
    embed = mm(n_img, cfg.in_channels, h) + mm(n_txt, cfg.context_in_dim, h)
    embed += vectors * (mm(1, 256, h) + mm(1, h, h)) + mm(1, cfg.vec_in_dim, h) + mm(1, h, h)
    attention = 4.0 * L * L * h
    stream = mm(1, h, 3 * h) + mm(1, h, h) + mm(1, h, m) + mm(1, m, h)  # per token
    double = stream * L + 2 * mm(1, h, 6 * h) + attention
    single = mm(L, h, 3 * h + m) + mm(L, h + m, h) + mm(1, h, 3 * h) + attention
    final = mm(1, h, 2 * h) + mm(n_img, h, cfg.out_channels)
    forward = embed + cfg.depth * double + cfg.depth_single_blocks * single + final
    return 3.0 * forward


# --------------------------------------------------------------------------------------------------------------
# Sharding and compilation
# --------------------------------------------------------------------------------------------------------------


def train_state_shardings(state: TrainState, tx: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings for every leaf of `state` (concrete or abstract): params, EMA and the optimizer's
    param-shaped moments follow the logical axis rules; counters are replicated."""
    from crrf_jax import parallel

    params = parallel.state_shardings(state.params, mesh)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, state.opt_state, params, transform_non_params=lambda _: parallel.replicated(mesh)
    )
    return state.replace(
        step=parallel.replicated(mesh),
        updates=parallel.replicated(mesh),
        guard=jax.tree.map(lambda _: parallel.replicated(mesh), state.guard),
        params=params,
        opt_state=opt,
        ema=params,
        rest=parallel.state_shardings(state.rest, mesh),
    )


def init_train_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh) -> TrainState:
    """Creates the model and its train state directly in their shardings (no full copy on one device)."""

    def init():
        return create_train_state(model_fn(), tx)

    shardings = train_state_shardings(jax.eval_shape(init), tx, mesh)
    return jax.jit(init, out_shardings=shardings)()


def compile_step(step_fn, state_shardings: TrainState, batch_shardings, frozen_shardings, mesh):
    """jit of `step_fn(state, batch, rng, frozen)` with explicit in/out shardings; the state is donated. The
    step is traced under `mesh` (`parallel.activations_on`), so the model's activation constraints apply."""
    from crrf_jax import parallel

    rep = parallel.replicated(mesh)

    @functools.wraps(step_fn)
    def on_mesh(*args):
        with parallel.activations_on(mesh):
            return step_fn(*args)

    return jax.jit(
        on_mesh,
        in_shardings=(state_shardings, batch_shardings, rep, frozen_shardings),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
