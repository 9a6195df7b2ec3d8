"""The FLUX transformer (BFL-compatible MM-DiT) and CloudRemovalFlux, which assembles its tokens.

`Flux` has BFL's parameters and call semantics (black-forest-labs/flux `src/flux/model.py`); its double and
single blocks are each one stacked module (leading 'layers' axis, built with nnx.vmap) run by nnx.scan, so
compile time does not grow with depth. `CloudRemovalFlux` turns latents, SAR and the cloud-probability map
into Flux's image and context streams (docs/ARCHITECTURE.md, "Models").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange, reduce
from flax import nnx

from crrf_jax.models.cloud_cnn import CloudProbEncoder
from crrf_jax.models.layers import (
    DoubleStreamBlock,
    DType,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    linear,
    timestep_embedding,
)
from crrf_jax.parallel import constrain_batch, gather_fsdp, with_axes

# Rematerialisation (gradient checkpointing) of each block: name -> jax.checkpoint policy.
REMAT_POLICIES = {
    "full": None,  # save only the block's inputs, recompute everything
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

PATCH = 2  # 2x2 latent patches per token


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """BFL's FluxParams."""

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"sum(axes_dim) = {sum(self.axes_dim)} must equal the head dim {head_dim}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FluxConfig:
        """From a dict or ConfigDict (configs/common.py flux_config); missing or unknown keys are errors."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(
                f"flux config: missing {sorted(names - set(d))}, unknown {sorted(set(d) - names)}"
            )
        return cls(**d)

    @classmethod
    def flux1_dev(cls) -> FluxConfig:
        """FLUX.1-dev (11,901,408,320 parameters)."""
        return cls(
            in_channels=64,
            out_channels=64,
            vec_in_dim=768,
            context_in_dim=4096,
            hidden_size=3072,
            mlp_ratio=4.0,
            num_heads=24,
            depth=19,
            depth_single_blocks=38,
            axes_dim=(16, 56, 56),
            theta=10_000,
            qkv_bias=True,
            guidance_embed=True,
        )


def _as_flux_config(config: FluxConfig | Mapping[str, Any]) -> FluxConfig:
    return config if isinstance(config, FluxConfig) else FluxConfig.from_dict(config)


def _stacked(make, n: int, rngs: nnx.Rngs):
    """n copies of the module `make(rngs)` stacked on a leading 'layers' axis (None when n == 0)."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make(rngs)

    return create(rngs)


def _save_all_but_constraints(prim, *_, **__) -> bool:
    """jax.checkpoint policy: save every intermediate but the outputs of sharding constraints. In the scanned
    blocks those are each layer's weights gathered over 'fsdp' (`parallel.gather_fsdp`), which the backward
    pass gathers again from the layer's split weights, and the blocks' outputs (`parallel.constrain_batch`),
    which are the next layer's inputs and kept as such. (Naming the gathered weights with checkpoint_name and
    excluding the name would not do: the constraint that makes the named value would be saved instead.)"""
    return prim.name != "sharding_constraint"


def _scan(step, blocks, carry, *broadcast, remat: bool = False, policy=None):
    """carry = step(block, *carry, *broadcast) for each block of the stacked `blocks`.

    A plain `jax.lax.scan` over the blocks' split state (the block is merged inside the body), so the model
    also runs where its weights are closed over by an outer JAX loop (e.g. the Euler sampler's fori_loop).
    With `remat`, each block is rematerialised in the backward pass under `policy` (a jax.checkpoint policy;
    None saves only the block's inputs).

    Under a mesh each layer's weights are gathered over 'fsdp' in the body (`parallel.gather_fsdp`). Where
    everything else is kept for the backward pass (no remat, or "everything_saveable") the gathered weights
    are not (`_save_all_but_constraints`): they are gathered again in the backward pass, as FSDP does, so no
    device keeps every layer's full weights at once. The other policies save no gathered weight anyway
    (they are not dot outputs).
    """
    if blocks is None:
        return carry
    graphdef, state = nnx.split(blocks)

    def body(carry, layer_state):
        # This layer's weights gathered over 'fsdp' before use (parallel.gather_fsdp; a no-op outside a mesh).
        return step(nnx.merge(graphdef, gather_fsdp(layer_state)), *carry, *broadcast), None

    if not remat or policy is jax.checkpoint_policies.everything_saveable:
        policy = _save_all_but_constraints
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, state)
    return carry


class Flux(nnx.Module):
    """The FLUX MM-DiT: `depth` double-stream blocks, then `depth_single_blocks` single-stream blocks.

    Args:
        config: FluxConfig (or a mapping of its fields).
        dtype: compute dtype of the matmuls (params stay float32).
        remat_policy: "none" or a key of REMAT_POLICIES; each block is rematerialised with that policy.
        zero_init: adaLN-Zero initialisation (zero modulation and final layer, DiT) for training from scratch;
            the output is then exactly zero until trained.
    """

    def __init__(
        self,
        config: FluxConfig | Mapping[str, Any],
        *,
        dtype: DType = jnp.float32,
        remat_policy: str = "none",
        zero_init: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        config = _as_flux_config(config)
        if remat_policy != "none" and remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {remat_policy!r}; choose 'none' or one of {list(REMAT_POLICIES)}"
            )
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.dtype = dtype
        self.remat_policy = remat_policy
        h = config.hidden_size
        self.pe_embedder = EmbedND(config.axes_dim, config.theta)
        self.img_in = linear(config.in_channels, h, ("in_features", "embed"), dtype=dtype, rngs=rngs)
        self.time_in = MLPEmbedder(256, h, dtype=dtype, rngs=rngs)
        self.vector_in = MLPEmbedder(config.vec_in_dim, h, dtype=dtype, rngs=rngs)
        self.guidance_in = MLPEmbedder(256, h, dtype=dtype, rngs=rngs) if config.guidance_embed else None
        self.txt_in = linear(config.context_in_dim, h, ("in_features", "embed"), dtype=dtype, rngs=rngs)
        self.double_blocks = _stacked(
            lambda r: DoubleStreamBlock(
                h,
                config.num_heads,
                config.mlp_ratio,
                config.qkv_bias,
                dtype=dtype,
                zero_init=zero_init,
                rngs=r,
            ),
            config.depth,
            rngs,
        )
        self.single_blocks = _stacked(
            lambda r: SingleStreamBlock(
                h, config.num_heads, config.mlp_ratio, dtype=dtype, zero_init=zero_init, rngs=r
            ),
            config.depth_single_blocks,
            rngs,
        )
        self.final_layer = LastLayer(h, 1, config.out_channels, dtype=dtype, zero_init=zero_init, rngs=rngs)

    def __call__(
        self,
        img: jax.Array,
        img_ids: jax.Array,
        txt: jax.Array,
        txt_ids: jax.Array,
        timesteps: jax.Array,
        y: jax.Array,
        guidance: jax.Array | None = None,
        key_mask: jax.Array | None = None,
    ) -> jax.Array:
        """img (B, N, in_channels), img_ids (B, N, 3), txt (B, M, context_in_dim), txt_ids (B, M, 3),
        timesteps (B,) in [0, 1] (t = 1 is noise), y (B, vec_in_dim), guidance (B,) (a CFG scale, needed when
        guidance_embed) -> (B, N, out_channels) float32. key_mask: optional (B, M + N) bool over [txt; img],
        False = a token nobody attends to (its own output is computed but meaningless)."""
        cfg = self.config
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C), got {img.shape} and {txt.shape}")
        if img.shape[-1] != cfg.in_channels or txt.shape[-1] != cfg.context_in_dim:
            raise ValueError(
                f"img has {img.shape[-1]} channels (expected {cfg.in_channels}), txt {txt.shape[-1]} "
                f"(expected {cfg.context_in_dim})"
            )
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux has guidance_embed=True: pass guidance (B,)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(jnp.concatenate([txt_ids, img_ids], axis=1))

        remat = {"remat": self.remat_policy != "none", "policy": REMAT_POLICIES.get(self.remat_policy)}
        # Every block's outputs pinned to the batch layout (parallel.constrain_batch; a no-op outside a mesh).
        img, txt = _scan(lambda block, img, txt, vec, pe: tuple(map(constrain_batch, block(img, txt, vec, pe, key_mask))),
                         self.double_blocks, (img, txt), vec, pe, **remat)
        (x,) = _scan(lambda block, x, vec, pe: (constrain_batch(block(x, vec, pe, key_mask)),),
                     self.single_blocks, (jnp.concatenate([txt, img], axis=1),), vec, pe, **remat)
        img = x[:, txt.shape[1] :]
        return self.final_layer(img, vec).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------------------
# CloudRemovalFlux
# ------------------------------------------------------------------------------------------------------------


def patchify(x: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, h/2 * w/2, C*4) tokens, channel order (c ph pw) as BFL."""
    return rearrange(x, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpatchify(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """(B, h/2 * w/2, C*4) -> (B, h, w, C); inverse of `patchify`."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b (h ph) (w pw) c", h=h // PATCH, ph=PATCH, pw=PATCH)


def position_ids(batch: int, h: int, w: int, stream: int) -> jax.Array:
    """RoPE ids (B, h/2 * w/2, 3) float32 of a token grid: (stream, row, col)."""
    rows, cols = jnp.meshgrid(jnp.arange(h // PATCH), jnp.arange(w // PATCH), indexing="ij")
    ids = jnp.stack([jnp.full_like(rows, stream), rows, cols], axis=-1).reshape(-1, 3)
    return jnp.broadcast_to(ids.astype(jnp.float32), (batch, *ids.shape))


class CloudRemovalFlux(nnx.Module):
    """Velocity model for cloud removal: Flux over [noisy target ; cloudy dates] tokens, SAR tokens as context.

    Token streams (RoPE axis 0): the noisy target is stream 0; cloudy date k (k = 1..T, chronological) is
    stream k, each token carrying its 2x2 latent patch and that date's cloud probability pooled to the token
    grid (4 channels); the SAR of date k is context stream `max_dates + k`. With max_dates = 1 that is noisy 0,
    cloudy 1, SAR 2: the single-image model. One model serves any T <= max_dates, and dates absent from a
    sample (`dates` False, e.g. dropped at random in training) are masked out of attention, so a sample with
    a date masked gets exactly the prediction it would get without that date (float reassociation aside).
    `y` (FLUX's vector input) is the cloud encoder's embedding averaged over the present dates.

    Args:
        flux_config: FluxConfig or mapping (configs/common.py flux_config): in_channels = 4*z + 4 (latent
            patch + pooled cloud probability), out_channels = 4*z, context_in_dim = 4*z.
        cloud_cnn_config: mapping with `channels` and `out_dim` (= vec_in_dim), as configs/common.py
            cloud_cnn_config.
        dtype, remat_policy, zero_init: as for Flux.
        embedded_guidance: what FLUX's guidance embedder receives when the config has guidance_embed (the
            `flux` variant, FLUX.1-dev's layout) and no guidance is passed: a constant, the same in training
            and sampling, so the layer is a learned bias of the conditioning vector (and, seeded from
            FLUX.1-dev, FLUX's conditioning at that distilled guidance scale). Classifier-free guidance stays
            the sampler's explicit `guidance_scale`.
        max_dates: the most cloudy dates a sample may carry (config.model.max_dates; 1 = single image).
    """

    def __init__(
        self,
        flux_config: FluxConfig | Mapping[str, Any],
        cloud_cnn_config: Mapping[str, Any],
        *,
        dtype: DType = jnp.float32,
        remat_policy: str = "none",
        zero_init: bool = False,
        embedded_guidance: float = 1.0,
        max_dates: int = 1,
        rngs: nnx.Rngs | None = None,
    ):
        cfg = _as_flux_config(flux_config)
        cnn = dict(cloud_cnn_config.to_dict() if hasattr(cloud_cnn_config, "to_dict") else cloud_cnn_config)
        token_dim = cfg.out_channels
        if token_dim % (PATCH * PATCH):
            raise ValueError(f"out_channels {token_dim} is not a 2x2 patch of latent channels")
        if cfg.in_channels != token_dim + PATCH * PATCH:
            raise ValueError(
                f"in_channels must be out_channels + 4 (cloud probability), got {cfg.in_channels}"
            )
        if cfg.context_in_dim != token_dim:
            raise ValueError(f"context_in_dim must equal out_channels {token_dim} (SAR latent tokens)")
        if cnn.get("out_dim") != cfg.vec_in_dim:
            raise ValueError(f"cloud_cnn out_dim {cnn.get('out_dim')} must equal vec_in_dim {cfg.vec_in_dim}")
        if int(max_dates) < 1:
            raise ValueError(f"max_dates must be >= 1, got {max_dates}")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.z_channels = token_dim // (PATCH * PATCH)
        self.embedded_guidance = float(embedded_guidance)
        self.max_dates = int(max_dates)
        self.flux = Flux(cfg, dtype=dtype, remat_policy=remat_policy, zero_init=zero_init, rngs=rngs)
        self.cloud_encoder = CloudProbEncoder(tuple(cnn["channels"]), cnn["out_dim"], dtype=dtype, rngs=rngs)
        null_init = with_axes(nnx.initializers.normal(0.02), "in_features")
        self.null_sar = nnx.Param(null_init(rngs.params(), (cfg.context_in_dim,), jnp.float32))
        self.null_cloudy = nnx.Param(null_init(rngs.params(), (token_dim,), jnp.float32))

    def __call__(
        self,
        x_t: jax.Array,
        t: jax.Array,
        cloudy_latent: jax.Array,
        sar_latent: jax.Array | None,
        cloud_prob: jax.Array,
        guidance: jax.Array | None = None,
        *,
        drop_sar: jax.Array | None = None,
        drop_cloudy: jax.Array | None = None,
        dates: jax.Array | None = None,
    ) -> jax.Array:
        """Predicted velocity (B, h, w, z) float32.

        x_t: (B, h, w, z) latent (h, w even). t: (B,) in [0, 1], t = 1 is the source.
        cloudy_latent: (B, h, w, z) (one date) or (B, T, h, w, z), T <= max_dates, dates in order.
        sar_latent: like cloudy_latent (the SAR of each date), or None: SAR absent (the null SAR token
        everywhere, as in training with SAR dropped).
        cloud_prob: (B, H, W, 1) or (B, T, H, W, 1) in [0, 1] at pixel resolution (H a multiple of h, 8h for
        our VAEs), one map per date.
        guidance: (B,), used when the Flux config has guidance_embed; None = `embedded_guidance`.
        drop_sar, drop_cloudy: (B,) bool; True replaces that sample's SAR / cloudy tokens (every date's) with
        the learned null token (condition dropout for CFG).
        dates: optional (B, T) bool, False = that date is absent for that sample (masked out of attention and
        of `y`); every sample needs at least one present date. None = all present.
        """
        b, h, w, _ = x_t.shape
        cloudy_latent, sar_latent, cloud_prob = self._with_dates(x_t, cloudy_latent, sar_latent, cloud_prob, dates)
        n_dates, (hp, wp) = cloudy_latent.shape[1], cloud_prob.shape[2:4]
        cp = cloud_prob.astype(jnp.float32)
        noisy = patchify(x_t.astype(jnp.float32))
        n = noisy.shape[1]
        img = [jnp.concatenate([noisy, jnp.zeros((b, n, PATCH * PATCH), jnp.float32)], axis=-1)]
        txt, img_ids, txt_ids = [], [position_ids(b, h, w, 0)], []
        for k in range(n_dates):
            cp_tokens = patchify(reduce(cp[:, k], "b (h fh) (w fw) c -> b h w c", "mean", fh=hp // h, fw=wp // w))
            cloudy = _replace(patchify(cloudy_latent[:, k].astype(jnp.float32)), drop_cloudy, self.null_cloudy[...])
            img.append(jnp.concatenate([cloudy, cp_tokens], axis=-1))
            img_ids.append(position_ids(b, h, w, 1 + k))
            if sar_latent is None:
                txt.append(jnp.broadcast_to(self.null_sar[...], (b, n, self.null_sar.shape[0])))
            else:
                txt.append(_replace(patchify(sar_latent[:, k].astype(jnp.float32)), drop_sar, self.null_sar[...]))
            txt_ids.append(position_ids(b, h, w, 1 + self.max_dates + k))
        img, img_ids = jnp.concatenate(img, axis=1), jnp.concatenate(img_ids, axis=1)
        txt, txt_ids = jnp.concatenate(txt, axis=1), jnp.concatenate(txt_ids, axis=1)

        embeddings = self.cloud_encoder(rearrange(cp, "b t h w c -> (b t) h w c"))
        embeddings = rearrange(embeddings, "(b t) d -> b t d", b=b)
        key_mask = None
        if dates is None:
            y = embeddings[:, 0] if n_dates == 1 else jnp.mean(embeddings, axis=1)
        else:
            present = jnp.asarray(dates, bool)
            weights = present.astype(jnp.float32)[..., None]
            y = jnp.sum(embeddings * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
            per_token = jnp.repeat(present, n, axis=1)  # (B, T * n), date-major like the token groups
            key_mask = jnp.concatenate([per_token, jnp.ones((b, n), bool), per_token], axis=1)  # [txt; img]
        if not self.flux.config.guidance_embed:
            guidance = None
        elif guidance is None:
            guidance = jnp.full((b,), self.embedded_guidance, jnp.float32)
        out = self.flux(img, img_ids, txt, txt_ids, t, y, guidance, key_mask)
        return unpatchify(out[:, :n], h, w)

    def _with_dates(self, x_t, cloudy_latent, sar_latent, cloud_prob, dates):
        """The conditioning with its T axis (a single date gets T = 1), checked against x_t."""
        b, h, w, z = x_t.shape
        if z != self.z_channels or h % PATCH or w % PATCH:
            raise ValueError(f"x_t must be (B, h, w, {self.z_channels}) with even h, w; got {x_t.shape}")
        cloudy_latent = cloudy_latent[:, None] if cloudy_latent.ndim == 4 else cloudy_latent
        n_dates = cloudy_latent.shape[1]
        if cloudy_latent.shape != (b, n_dates, h, w, z):
            raise ValueError(f"cloudy_latent {cloudy_latent.shape} must be (B, [T,] h, w, z) of x_t {x_t.shape}")
        if n_dates > self.max_dates:
            raise ValueError(f"{n_dates} cloudy dates, but this model takes at most max_dates={self.max_dates}")
        if sar_latent is not None:
            sar_latent = sar_latent[:, None] if sar_latent.ndim == 4 else sar_latent
            if sar_latent.shape != cloudy_latent.shape:
                raise ValueError(f"sar_latent {sar_latent.shape} must match cloudy_latent {cloudy_latent.shape}")
        cloud_prob = cloud_prob[:, None] if cloud_prob.ndim == 4 else cloud_prob
        hp, wp = cloud_prob.shape[2:4] if cloud_prob.ndim == 5 else (0, 0)
        if (cloud_prob.shape[:2] != (b, n_dates) or cloud_prob.shape[-1] != 1 or hp < h or hp % h or wp % w
                or hp // h != wp // w):
            raise ValueError(f"cloud_prob must be (B, [T,] k*{h}, k*{w}, 1) with T = {n_dates}, "
                             f"got {cloud_prob.shape}")
        if dates is not None and jnp.shape(dates) != (b, n_dates):
            raise ValueError(f"dates must be (B, T) = {(b, n_dates)}, got {jnp.shape(dates)}")
        return cloudy_latent, sar_latent, cloud_prob


def _replace(tokens: jax.Array, drop: jax.Array | None, null: jax.Array) -> jax.Array:
    """tokens (B, L, C) with the samples where drop (B,) is True replaced by the null token (C,)."""
    if drop is None:
        return tokens
    drop = jnp.asarray(drop, bool)
    if drop.shape != tokens.shape[:1]:
        raise ValueError(f"drop mask must be (B,) = {tokens.shape[:1]}, got {drop.shape}")
    return jnp.where(drop[:, None, None], null.astype(tokens.dtype), tokens)
