"""Latent sampling with trained networks: patches in, the per-pixel mean and spread of K samples out.

- `Networks`: the networks split into static graphs and array states, so they pass through jit. The flow
  stage's frozen VAEs are a `Networks` without flow (`Networks.of_vaes`), the refiner stage's frozen flow and
  VAEs one without refiner.
- `sample_patches(nets, s2_cloudy, s1, cloud_prob, keys, ...)`: K Euler samples per patch, each decoded (and
  refined); `sample_patches_jit` is its jitted form (CloudRemover, the refiner stage and `predict_batch`).
- `predict_batch(flow_model, vae_s2, vae_s1, batch, rng, ...)`: modules and a batch in, (mean, std) out
  (train.py's previews use it).

Tiling whole scenes is crrf_jax.tiling's job, loading a model crrf_jax.inference's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from crrf_jax import flow as rf
from crrf_jax import temporal
from crrf_jax.data import contract


@struct.dataclass
class Networks:
    """The networks split into static graphs and array states, so they pass through jit.

    The VAEs are always there; the flow model is optional (None: only the VAEs, as the flow stage freezes
    them) and so is the refiner (None: the flow's decoded prediction is the output).
    """

    s2_graph: nnx.GraphDef = struct.field(pytree_node=False)
    s2_state: nnx.State
    s1_graph: nnx.GraphDef = struct.field(pytree_node=False)
    s1_state: nnx.State
    flow_graph: nnx.GraphDef | None = struct.field(pytree_node=False, default=None)
    flow_state: nnx.State | None = None
    refiner_graph: nnx.GraphDef | None = struct.field(pytree_node=False, default=None)
    refiner_state: nnx.State | None = None

    @classmethod
    def of(cls, flow_model, vae_s2, vae_s1, refiner=None) -> Networks:
        """From modules; `flow_model`, `vae_s1` (a model without SAR) and `refiner` may be None."""
        split = lambda module: nnx.split(module) if module is not None else (None, None)  # noqa: E731
        return cls(*split(vae_s2), *split(vae_s1), *split(flow_model), *split(refiner))

    @classmethod
    def of_vaes(cls, vae_s2, vae_s1) -> Networks:
        """The autoencoders alone: what the flow stage keeps frozen."""
        return cls.of(None, vae_s2, vae_s1)

    @property
    def has_flow(self) -> bool:
        return self.flow_graph is not None

    @property
    def has_refiner(self) -> bool:
        return self.refiner_graph is not None

    def vae_s2(self):
        return nnx.merge(self.s2_graph, self.s2_state)

    def vae_s1(self):
        return nnx.merge(self.s1_graph, self.s1_state) if self.s1_graph is not None else None

    def flow(self):
        return nnx.merge(self.flow_graph, self.flow_state) if self.has_flow else None

    def refiner(self):
        return nnx.merge(self.refiner_graph, self.refiner_state) if self.has_refiner else None


# What a prediction returns: "final" (the refined image when there is a refiner), "flow" (the flow's decoded
# prediction alone) or "roundtrip_refined" (the refiner fed with the cloudy image's VAE round trip instead of
# the flow's prediction: an ablation that shows what the latent flow itself adds).
OUTPUTS = ("final", "flow", "roundtrip_refined")


def sample_patches(
    nets: Networks,
    s2_cloudy: jax.Array,
    s1: jax.Array | None,
    cloud_prob: jax.Array,
    keys: jax.Array,
    *,
    steps: int,
    num_samples: int = 1,
    guidance_scale: float = 1.0,
    spec: rf.FlowSpec = rf.FlowSpec(),
    output: str = "final",
    drop_cloudy: bool = False,
    drop_sar: jax.Array | None = None,
    samples_per_pass: int = 1,
    present: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """K Euler samples of the cloud-free image of each patch -> per-pixel mean and standard deviation.

    Args:
      s2_cloudy: (B, H, W, C) reflectance in [0, 1], or (B, T, H, W, C): T dates in order (up to the flow
        model's max_dates; the flow then starts from their least-cloudy composite, which the refiner also
        sees); s1: (B, [T,] H, W, 2) in [0, 1] or None (the model's SAR-absent mode); cloud_prob:
        (B, [T,] H, W, 1) in [0, 1]. H, W multiples of 16. s2_cloudy and cloud_prob may be the pipelines'
        compact uint16 DN / uint8: normalised here first (`contract.normalize_array`).
      keys: (B,) PRNG keys, one per patch; sample k of patch i starts from noise drawn with
        `fold_in(keys[i], k)`, so a patch's result does not depend on the rest of the batch.
      steps: Euler steps; guidance_scale: classifier-free guidance (1 = off; the unconditional branch
        replaces SAR and cloudy tokens with the learned null tokens); spec: the flow's source and schedule.
      output: one of OUTPUTS; each sample is refined before the statistics, so std covers the refiner too.
      drop_cloudy: replace the cloudy tokens by the null token (an ablation; the source still starts there).
      drop_sar: optional (B,) bool, True = that patch runs the SAR-absent mode (the refiner stage's training
        uses it; `s1=None` does it for the whole batch).
      samples_per_pass: P, how many of the K samples run together as extra batch rows (`flow.ensemble_sample`:
        ceil(K / P) passes of P * B rows, a patch's rows next to each other); the latents are encoded once and
        the conditioning repeated. The result does not depend on P (up to float reduction order).
      present: optional (B, T) bool for T-date inputs, False = that date is absent for the flow, the
        composite and the refiner (the refiner stage trains with dropped dates); None = all present.
    Returns:
      (mean, std): (B, H, W, C) float32 reflectance (not clipped); std is the population standard deviation
      over the K samples (0 for K = 1).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    s2_cloudy = contract.normalize_array("s2_cloudy", s2_cloudy)
    cloud_prob = contract.normalize_array("cloud_prob", cloud_prob)
    flow_model, vae_s2, refiner = nets.flow(), nets.vae_s2(), nets.refiner()
    if output == "roundtrip_refined" and refiner is None:
        raise ValueError("output='roundtrip_refined' needs a refiner; this model has none")
    if output != "roundtrip_refined" and flow_model is None:
        raise ValueError(f"output={output!r} needs a flow model; these networks hold only the VAEs")
    cloudy = encode(vae_s2, s2_cloudy)
    sar = None if s1 is None else encode(nets.vae_s1(), s1)
    several = temporal.is_multitemporal(s2_cloudy)
    composite = temporal.composite(s2_cloudy, cloud_prob, present) if several else s2_cloudy
    source = encode(vae_s2, composite) if several else cloudy
    b, h, w, z = source.shape
    sar_present = None if drop_sar is None else ~jnp.asarray(drop_sar, bool)

    def refine(pixels):
        if output == "flow" or refiner is None:
            return pixels
        return refiner(pixels, *_repeat_rows(pixels.shape[0] // b, s2_cloudy, cloud_prob, s1, sar_present, present))[0]

    def decode(x0):
        return refine(contract.from_model(vae_s2.decode(x0).astype(jnp.float32)))

    if output == "roundtrip_refined":
        return decode(source), jnp.zeros(composite.shape, jnp.float32)

    velocity = _velocity_fn(flow_model, cloudy, sar, cloud_prob, guidance_scale, drop_cloudy, drop_sar, present)

    def start(k):
        eps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), (h, w, z)))(keys)
        return spec.start(eps, source)

    schedule = spec.schedule(steps, (h // 2) * (w // 2))
    return rf.ensemble_sample(velocity, keys[0], (b, h, w, z), schedule, num_samples, decode_fn=decode,
                              noise_fn=start, samples_per_pass=samples_per_pass)


def encode(vae, images: jax.Array) -> jax.Array:
    """float32 latents of (B, H, W, C) or (B, T, H, W, C) images in [0, 1] (each date encoded on its own)."""
    z = vae.encode(contract.to_model(temporal.flatten_dates(images))).astype(jnp.float32)
    return temporal.unflatten_dates(z, images.shape[1]) if images.ndim == 5 else z


def _repeat_rows(repeats: int, *arrays):
    """Each array (B, ...) with every row repeated `repeats` times in place, (B * repeats, ...) (None stays
    None): the conditioning of a pass of several samples per patch, whose rows are patch-major."""
    if repeats == 1:
        return arrays
    return tuple(None if a is None else jnp.repeat(a, repeats, axis=0) for a in arrays)


def vae_roundtrip(vae, pixels: jax.Array) -> jax.Array:
    """decode(encode(x)) of an autoencoder on images (B, H, W, C) in [0, 1] -> float32 in about [0, 1] (not
    clipped): the latent ceiling, the refiner's flow-free input, the autoencoder stages' previews."""
    return contract.from_model(vae.decode(vae.encode(contract.to_model(pixels))).astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def vae_roundtrip_jit(graphdef, state, pixels: jax.Array) -> jax.Array:
    """`vae_roundtrip` of an autoencoder split into (graphdef, state): compiled once per model and shape (a
    closure over the module would embed its weights and compile anew each call)."""
    return vae_roundtrip(nnx.merge(graphdef, state), pixels)


def _velocity_fn(flow_model, cloudy, sar, cloud_prob, guidance_scale: float, drop_cloudy: bool, drop_sar,
                 present=None):
    """v(x_t, t) of the conditioned flow model; with guidance, v_u + s (v_c - v_u), both branches in one call
    of twice the batch (the unconditional one with SAR and cloudy tokens replaced by the null tokens).

    x_t may hold r rows per patch (r samples of a pass, patch-major): the conditioning is repeated to
    match."""
    patches = cloudy.shape[0]
    drop_all = jnp.full((patches,), bool(drop_cloudy))
    drop_sar_all = jnp.zeros((patches,), bool) if drop_sar is None else jnp.asarray(drop_sar, bool)

    def velocity(x, t):
        b = x.shape[0]
        cloudy_, sar_, cloud_prob_, cond_drop, cond_drop_sar, present_ = _repeat_rows(
            b // patches, cloudy, sar, cloud_prob, drop_all, drop_sar_all, present)
        if guidance_scale == 1.0:
            return flow_model(x, t, cloudy_, sar_, cloud_prob_, drop_sar=cond_drop_sar,
                              drop_cloudy=cond_drop, dates=present_).astype(jnp.float32)

        def both(a):
            return None if a is None else jnp.concatenate([a, a])

        ones = jnp.ones((b,), bool)
        v = flow_model(both(x), both(t), both(cloudy_), both(sar_), both(cloud_prob_),
                       drop_sar=jnp.concatenate([cond_drop_sar, ones]),
                       drop_cloudy=jnp.concatenate([cond_drop, ones]), dates=both(present_)).astype(jnp.float32)
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return velocity


sample_patches_jit = jax.jit(
    sample_patches,
    static_argnames=("steps", "num_samples", "guidance_scale", "spec", "output", "drop_cloudy",
                     "samples_per_pass"),
)


def predict_batch(
    flow_model,
    vae_s2,
    vae_s1,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    steps: int = 8,
    guidance_scale: float = 1.0,
    num_samples: int = 1,
    use_sar: bool = True,
    spec: rf.FlowSpec = rf.FlowSpec(),
    refiner=None,
    output: str = "final",
) -> tuple[jax.Array, jax.Array]:
    """Cloud-free estimates of a batch of patches.

    Args:
      batch: `s2_cloudy` (B, [T,] H, W, C) and `cloud_prob` (B, [T,] H, W, 1) in [0, 1], `s1` (B, [T,] H, W, 2)
        in [0, 1] (ignored when `use_sar` is False, or absent: the model's trained SAR-absent mode). H, W
        multiples of 16; T dates as `sample_patches` takes them; compact dtypes are normalised inside the
        jitted sampler.
      rng: one PRNG key for the batch (split into one key per patch).
      steps, guidance_scale, num_samples, spec, output: see `sample_patches`; refiner: optional Refiner.
    Returns:
      (mean, std): (B, H, W, C) float32 reflectance; the mean is clipped to [0, 1], the std is the per-pixel
      standard deviation over the K samples (0 for K = 1).
    """
    nets = Networks.of(flow_model, vae_s2, vae_s1, refiner)
    keys = jax.random.split(rng, batch["s2_cloudy"].shape[0])
    mean, std = sample_patches_jit(
        nets, batch["s2_cloudy"], batch.get("s1") if use_sar else None, batch["cloud_prob"], keys,
        steps=int(steps), num_samples=int(num_samples), guidance_scale=float(guidance_scale), spec=spec,
        output=output,
    )
    return jnp.clip(mean, 0.0, 1.0), std
