"""Cloud removal with trained networks: batched latent sampling, tiling, and CloudRemover for whole scenes.

- `predict_batch(flow_model, vae_s2, vae_s1, batch, rng, ...)`: patches in, (mean, std) out (train.py's
  previews and eval use it).
- `CloudRemover`: a bundle (crrf_jax.export) or a training workdir -> `remove_clouds(s2_cloudy, s1, ...)` on
  scenes of any size: overlapping tiles, batched over the ('data',) mesh axis, blended with a raised-cosine
  window so seams do not show; scenes smaller than a tile are reflect-padded and cropped back.
- `blend_tiles(...)`: the streaming tiler under both, which reads and writes rows of tiles so memory stays
  bounded on large scenes; `predict_scene(remover, s2_path, ...)` runs it on GeoTIFFs (crrf_jax.predict).

Noise is drawn per tile from `fold_in(key(seed), tile index)`, so a result depends on the seed and the tile
layout but not on the batch size or the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from crrf_jax import flow as rf
from crrf_jax import parallel

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------------


@struct.dataclass
class Networks:
    """The networks split into static graphs and array states, so they pass through jit. The refiner is
    optional (None: the flow's decoded prediction is the output)."""

    flow_graph: nnx.GraphDef = struct.field(pytree_node=False)
    flow_state: nnx.State
    s2_graph: nnx.GraphDef = struct.field(pytree_node=False)
    s2_state: nnx.State
    s1_graph: nnx.GraphDef = struct.field(pytree_node=False)
    s1_state: nnx.State
    refiner_graph: nnx.GraphDef | None = struct.field(pytree_node=False, default=None)
    refiner_state: nnx.State | None = None

    @classmethod
    def of(cls, flow_model, vae_s2, vae_s1, refiner=None) -> Networks:
        parts = nnx.split(refiner) if refiner is not None else (None, None)
        return cls(*nnx.split(flow_model), *nnx.split(vae_s2), *nnx.split(vae_s1), *parts)

    @property
    def has_refiner(self) -> bool:
        return self.refiner_graph is not None

    def flow(self):
        return nnx.merge(self.flow_graph, self.flow_state)

    def vae_s2(self):
        return nnx.merge(self.s2_graph, self.s2_state)

    def vae_s1(self):
        return nnx.merge(self.s1_graph, self.s1_state)

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
) -> tuple[jax.Array, jax.Array]:
    """K Euler samples of the cloud-free image of each patch -> per-pixel mean and standard deviation.

    Args:
      s2_cloudy: (B, H, W, C) reflectance in [0, 1]; s1: (B, H, W, 2) in [0, 1] or None (the model's
        SAR-absent mode); cloud_prob: (B, H, W, 1) in [0, 1]. H, W multiples of 16.
      keys: (B,) PRNG keys, one per patch; sample k of patch i starts from noise drawn with
        `fold_in(keys[i], k)`, so a patch's result does not depend on the rest of the batch.
      steps: Euler steps; guidance_scale: classifier-free guidance (1 = off; the unconditional branch
        replaces SAR and cloudy tokens with the learned null tokens); spec: the flow's source and schedule.
      output: one of OUTPUTS; each sample is refined before the statistics, so std covers the refiner too.
      drop_cloudy: replace the cloudy tokens by the null token (an ablation; the source still starts there).
      drop_sar: optional (B,) bool, True = that patch runs the SAR-absent mode (the refiner stage's training
        uses it; `s1=None` does it for the whole batch).
    Returns:
      (mean, std): (B, H, W, C) float32 reflectance (not clipped); std is the population standard deviation
      over the K samples (0 for K = 1).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    flow_model, vae_s2, refiner = nets.flow(), nets.vae_s2(), nets.refiner()
    if output == "roundtrip_refined" and refiner is None:
        raise ValueError("output='roundtrip_refined' needs a refiner; this model has none")
    cloudy = vae_s2.encode(s2_cloudy * 2.0 - 1.0).astype(jnp.float32)
    sar = None if s1 is None else nets.vae_s1().encode(s1 * 2.0 - 1.0).astype(jnp.float32)
    b, h, w, z = cloudy.shape

    sar_present = None if drop_sar is None else ~jnp.asarray(drop_sar, bool)

    def refine(pixels):
        if output == "flow" or refiner is None:
            return pixels
        return refiner(pixels, s2_cloudy, cloud_prob, s1, sar_present)[0]

    def decode(x0):
        return refine((vae_s2.decode(x0).astype(jnp.float32) + 1.0) * 0.5)

    if output == "roundtrip_refined":
        return decode(cloudy), jnp.zeros(s2_cloudy.shape, jnp.float32)

    cond_drop = jnp.full((b,), bool(drop_cloudy))
    cond_drop_sar = jnp.zeros((b,), bool) if drop_sar is None else jnp.asarray(drop_sar, bool)

    def velocity(x, t):
        if guidance_scale == 1.0:
            return flow_model(x, t, cloudy, sar, cloud_prob, drop_sar=cond_drop_sar,
                              drop_cloudy=cond_drop).astype(jnp.float32)
        # Conditional and unconditional branches in one call of twice the batch.
        def both(a):
            return None if a is None else jnp.concatenate([a, a])

        ones = jnp.ones((b,), bool)
        v = flow_model(both(x), both(t), both(cloudy), both(sar), both(cloud_prob),
                       drop_sar=jnp.concatenate([cond_drop_sar, ones]),
                       drop_cloudy=jnp.concatenate([cond_drop, ones])).astype(jnp.float32)
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def start(k):
        eps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), (h, w, z)))(keys)
        return spec.start(eps, cloudy)

    schedule = spec.schedule(steps, (h // 2) * (w // 2))
    return rf.ensemble_sample(velocity, keys[0], (b, h, w, z), schedule, num_samples, decode_fn=decode,
                              noise_fn=start)


_sample_jit = jax.jit(
    sample_patches, static_argnames=("steps", "num_samples", "guidance_scale", "spec", "output", "drop_cloudy")
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
      batch: `s2_cloudy` (B, H, W, C) and `cloud_prob` (B, H, W, 1) in [0, 1], `s1` (B, H, W, 2) in [0, 1]
        (ignored when `use_sar` is False: the model's trained SAR-absent mode). H, W multiples of 16.
      rng: one PRNG key for the batch (split into one key per patch).
      steps, guidance_scale, num_samples, spec, output: see `sample_patches`; refiner: optional Refiner.
    Returns:
      (mean, std): (B, H, W, C) float32 reflectance; the mean is clipped to [0, 1], the std is the per-pixel
      standard deviation over the K samples (0 for K = 1).
    """
    nets = Networks.of(flow_model, vae_s2, vae_s1, refiner)
    keys = jax.random.split(rng, batch["s2_cloudy"].shape[0])
    mean, std = _sample_jit(
        nets, batch["s2_cloudy"], batch["s1"] if use_sar else None, batch["cloud_prob"], keys,
        steps=int(steps), num_samples=int(num_samples), guidance_scale=float(guidance_scale), spec=spec,
        output=output,
    )
    return jnp.clip(mean, 0.0, 1.0), std


# ------------------------------------------------------------------------------------------------------------
# Tiling
# ------------------------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of tiles of `tile` pixels covering max(length, tile) pixels, overlapping >= `overlap`.

    The first tile starts at 0, the last ends at the edge, the others are spread evenly between.
    """
    span = max(length, tile)
    if span == tile:
        return (0,)
    n = math.ceil((span - tile) / (tile - overlap)) + 1
    return tuple(int(round(s)) for s in np.linspace(0, span - tile, n))


def blend_ramp(tile: int, overlap: int, taper_start: bool = True, taper_end: bool = True) -> np.ndarray:
    """1-D blend weights (tile,) float32: a raised-cosine rise over the first `overlap` pixels and fall over
    the last (only on tapered sides: a side on the scene border keeps weight 1), 1 in between, > 0 everywhere.
    """
    w = np.ones(tile, np.float32)
    if overlap > 0:
        rise = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        if taper_start:
            w[:overlap] = np.minimum(w[:overlap], rise)
        if taper_end:
            w[tile - overlap :] = np.minimum(w[tile - overlap :], rise[::-1])
    return w


def pad_to(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(h, w, ...) -> (max(h, rows), max(w, cols), ...) by reflection at the bottom and right edges."""
    pad_r, pad_c = max(rows - array.shape[0], 0), max(cols - array.shape[1], 0)
    if not pad_r and not pad_c:
        return array
    widths = [(0, pad_r), (0, pad_c)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode="reflect")


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Where the tiles of a height x width scene lie (on the reflect-padded grid of at least one tile)."""

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"scene size {self.height}x{self.width} is empty")
        if not 0 <= self.overlap <= self.tile // 2:
            raise ValueError(f"overlap {self.overlap} must be in [0, tile/2 = {self.tile // 2}]")

    @functools.cached_property
    def ys(self) -> tuple[int, ...]:
        return tile_starts(self.height, self.tile, self.overlap)

    @functools.cached_property
    def xs(self) -> tuple[int, ...]:
        return tile_starts(self.width, self.tile, self.overlap)

    @property
    def padded_height(self) -> int:
        return max(self.height, self.tile)

    @property
    def padded_width(self) -> int:
        return max(self.width, self.tile)

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def window(self, row: int, col: int) -> np.ndarray:
        """Blend weights (tile, tile) float32 of tile (row, col); no taper on the scene's outer edges."""
        wy = blend_ramp(self.tile, self.overlap, row > 0, row < len(self.ys) - 1)
        wx = blend_ramp(self.tile, self.overlap, col > 0, col < len(self.xs) - 1)
        return np.outer(wy, wx)


ReadRows = Callable[[int, int], Arrays]  # (y0, y1) on the padded grid -> name: (y1 - y0, padded_width, C)
PredictTiles = Callable[[Arrays, np.ndarray], tuple[np.ndarray, np.ndarray]]  # tiles, ids -> mean, std
WriteRows = Callable[[int, int, np.ndarray, np.ndarray], None]  # y0, y1, mean/std (y1 - y0, width, C)


class _RowAccumulator:
    """Weighted sums of blended tiles over a band of rows [start, start + len) of the padded grid."""

    def __init__(self, width: int):
        self.start, self.width = 0, width
        self.mean = self.std = self.weight = None

    def add(self, y: int, x: int, mean: np.ndarray, std: np.ndarray, weight: np.ndarray) -> None:
        t, c = mean.shape[0], mean.shape[-1]
        if self.mean is None:
            self.mean = np.zeros((0, self.width, c), np.float32)
            self.std = np.zeros((0, self.width, c), np.float32)
            self.weight = np.zeros((0, self.width), np.float32)
        grow = y + t - self.start - self.weight.shape[0]
        if grow > 0:
            self.mean = np.concatenate([self.mean, np.zeros((grow, self.width, c), np.float32)])
            self.std = np.concatenate([self.std, np.zeros((grow, self.width, c), np.float32)])
            self.weight = np.concatenate([self.weight, np.zeros((grow, self.width), np.float32)])
        rows = slice(y - self.start, y - self.start + t)
        self.mean[rows, x : x + t] += weight[..., None] * mean
        self.std[rows, x : x + t] += weight[..., None] * std
        self.weight[rows, x : x + t] += weight

    def pop(self, until: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, until), finished: weighted means of the tiles' mean and std; they leave the band."""
        n = until - self.start
        w = self.weight[:n, :, None]
        if np.any(w <= 0):
            raise AssertionError("blend_tiles: a pixel was covered by no tile")
        out = self.mean[:n] / w, self.std[:n] / w
        self.mean, self.std, self.weight = self.mean[n:], self.std[n:], self.weight[n:]
        self.start = until
        return out


def blend_tiles(
    layout: TileLayout,
    read_rows: ReadRows,
    predict: PredictTiles,
    write_rows: WriteRows,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> None:
    """Predicts a scene tile by tile and writes the blended result row band by row band.

    Tiles are read one row of tiles at a time (`read_rows(y, y + tile)`), predicted `batch_size` at a time
    (`predict(tiles, tile_ids)` with tiles name -> (n, tile, tile, C) and ids the row-major tile indices), and
    blended with `layout.window`: every output pixel is the weight-normalised mean of the tiles covering it.
    As soon as no later tile reaches a row, it is written (`write_rows(y0, y1, mean, std)`, cropped to the
    scene), so memory holds about two rows of tiles whatever the scene size.
    """
    from tqdm.auto import tqdm

    t = layout.tile
    acc = _RowAccumulator(layout.padded_width)
    remaining = [len(layout.xs)] * len(layout.ys)  # tiles of each tile row not yet blended
    next_row = 0  # first tile row not yet complete

    def tiles() -> Iterator[tuple[int, int, Arrays]]:
        for r, y in enumerate(layout.ys):
            band = read_rows(y, y + t)
            for c, x in enumerate(layout.xs):
                yield r, c, {k: v[:, x : x + t] for k, v in band.items()}

    def flush() -> None:
        nonlocal next_row
        while next_row < len(layout.ys) and remaining[next_row] == 0:
            next_row += 1
        until = layout.ys[next_row] if next_row < len(layout.ys) else layout.padded_height
        if until > acc.start:
            y0 = acc.start
            mean, std = acc.pop(until)
            end = min(until, layout.height)
            if end > y0:
                write_rows(y0, end, mean[: end - y0, : layout.width], std[: end - y0, : layout.width])

    n_batches = math.ceil(layout.num_tiles / batch_size)
    bar = tqdm(total=n_batches, desc="tile batches", unit="batch", disable=not progress, dynamic_ncols=True)
    batch: list[tuple[int, int, Arrays]] = []
    stream = tiles()
    try:
        while True:
            item = next(stream, None)
            if item is not None:
                batch.append(item)
            if batch and (len(batch) == batch_size or item is None):
                stacked = {k: np.stack([b[2][k] for b in batch]) for k in batch[0][2]}
                ids = np.asarray([r * len(layout.xs) + c for r, c, _ in batch], np.int32)
                mean, std = predict(stacked, ids)
                for i, (r, c, _) in enumerate(batch):
                    acc.add(layout.ys[r], layout.xs[c], mean[i], std[i], layout.window(r, c))
                    remaining[r] -= 1
                batch = []
                flush()
                bar.update(1)
            if item is None:
                break
    finally:
        bar.close()
    if acc.start != layout.padded_height:
        raise AssertionError(f"blend_tiles: rows {acc.start}..{layout.height} were never written")


# ------------------------------------------------------------------------------------------------------------
# CloudRemover
# ------------------------------------------------------------------------------------------------------------


class CloudRemover:
    """Trained networks ready for prediction, replicated over a mesh whose ('data', 'fsdp') axes batch tiles.

    Build with `from_bundle(path)` (crrf_jax.export bundles; no training config needed) or
    `from_workdir(workdir)` (a finished training run). `config` is the bundle config (export.bundle_config).
    Inference runs in one process (on all its local devices); tiles are host arrays put onto the mesh.
    """

    def __init__(self, flow_model, vae_s2, vae_s1, config: dict[str, Any], *, mesh=None, refiner=None):
        self.config = config
        self.mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
        nets = Networks.of(flow_model, vae_s2, vae_s1, refiner)
        self.nets = jax.device_put(nets, parallel.replicated(self.mesh))
        self.spec = rf.FlowSpec.from_config(config["sampling"])
        self.tile_multiple = vae_s2.config.downsample_factor * 2  # latent 2x2 patches
        self.num_bands = vae_s2.config.in_channels

    # ---- construction

    @classmethod
    def from_parts(cls, parts, *, mesh=None, dtype: str | None = None) -> CloudRemover:
        """From export.ModelParts (weights as host arrays); `dtype` overrides the compute dtype."""
        from crrf_jax import export

        modules = {
            name: export.fill_state(export.abstract_network(parts.config, name, dtype), parts.states[name],
                                    f"{parts.source} ({name})")
            for name in parts.states
        }
        for name in ("vae_s2", "vae_s1"):
            modules[name].set_latent_stats(**parts.latent_stats[name])
        return cls(modules["flow"], modules["vae_s2"], modules["vae_s1"], parts.config, mesh=mesh,
                   refiner=modules.get("refiner"))

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, mesh=None, dtype: str | None = None) -> CloudRemover:
        from crrf_jax import export

        return cls.from_parts(export.read_bundle(path), mesh=mesh, dtype=dtype)

    @classmethod
    def from_workdir(
        cls, workdir: str | os.PathLike, config=None, *, mesh=None, dtype: str | None = None
    ) -> CloudRemover:
        """From a finished training run; `config` defaults to the run's saved `<workdir>/config.json`."""
        from crrf_jax import export

        return cls.from_parts(export.read_workdir(workdir, config), mesh=mesh, dtype=dtype)

    # ---- what the model expects

    @property
    def band_indices(self) -> tuple[int, ...]:
        """0-based indices into the 13 SEN12MS-CR bands of the bands the model works on."""
        return tuple(self.config["bands"]["indices"])

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(self.config["bands"]["names"])

    @property
    def trained_with_sar(self) -> bool:
        return bool(self.config.get("trained_with_sar", True))

    @property
    def has_refiner(self) -> bool:
        return self.nets.has_refiner

    @property
    def num_devices(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    # ---- tiles

    def predict_tiles(
        self,
        tiles: Arrays,
        tile_ids: np.ndarray,
        *,
        steps: int | None = None,
        num_samples: int = 1,
        guidance_scale: float | None = None,
        seed: int = 0,
        pad_batch_to: int | None = None,
        output: str = "final",
        drop_cloudy: bool = False,
        keep_clear: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Samples a batch of tiles on the mesh.

        tiles: "s2_cloudy" (n, T, T, C), "cloud_prob" (n, T, T, 1), optionally "s1" (n, T, T, 2), all in
        [0, 1]; tile_ids (n,) ints seeding each tile's noise (with `seed`). The batch is padded to
        `pad_batch_to` (default n) rounded up to a multiple of the device count, so every batch of a scene
        compiles once. output, drop_cloudy: see `sample_patches`. keep_clear: pixels whose cloud probability
        is below it come back as they came in (std 0); None keeps the model's output everywhere.
        Returns host (mean clipped to [0, 1], std), each (n, T, T, C) float32.
        """
        steps = int(steps or self.config["sampling"]["steps"])
        default_guidance = self.config["sampling"]["guidance_scale"]
        guidance = float(default_guidance if guidance_scale is None else guidance_scale)
        n = int(tile_ids.shape[0])
        size = -(-max(n, pad_batch_to or 0) // self.num_devices) * self.num_devices
        names = ["s2_cloudy", "cloud_prob"] + (["s1"] if tiles.get("s1") is not None else [])

        def put(a: np.ndarray) -> jax.Array:
            a = np.asarray(a)
            if size > n:
                a = np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)])
            return jax.device_put(a, parallel.batch_sharding(self.mesh, a.ndim))

        device = {k: put(np.asarray(tiles[k], np.float32)) for k in names}
        ids = put(np.asarray(tile_ids, np.uint32))
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(ids)
        mean, std = _sample_jit(
            self.nets, device["s2_cloudy"], device.get("s1"), device["cloud_prob"], keys,
            steps=steps, num_samples=int(num_samples), guidance_scale=guidance, spec=self.spec,
            output=output, drop_cloudy=bool(drop_cloudy),
        )
        mean, std = np.clip(np.asarray(mean)[:n], 0.0, 1.0), np.asarray(std)[:n]
        if keep_clear is not None:
            mean, std = keep_clear_pixels(mean, std, tiles["s2_cloudy"], tiles["cloud_prob"], keep_clear)
        return mean, std

    def check_tiling(self, tile_size: int | None, overlap: int | None) -> tuple[int, int]:
        """(tile, overlap), defaults from the bundle; tile must be a positive multiple of `tile_multiple`."""
        tile = int(tile_size or self.config["tiling"]["tile_size"])
        overlap = min(int(self.config["tiling"]["overlap"]), tile // 2) if overlap is None else int(overlap)
        if tile < self.tile_multiple or tile % self.tile_multiple:
            raise ValueError(f"tile size {tile} must be a positive multiple of {self.tile_multiple}")
        if not 0 <= overlap <= tile // 2:
            raise ValueError(f"overlap {overlap} must be in [0, tile/2 = {tile // 2}]")
        return tile, overlap

    def use_sar(self, has_s1: bool) -> bool:
        """Whether SAR conditions the model: given and trained with; logs a warning for the degraded mode."""
        if has_s1 and not self.trained_with_sar:
            log.warning("the model was trained without SAR: the given Sentinel-1 image is ignored")
            return False
        if not has_s1:
            log.warning("no Sentinel-1 image: running the degraded SAR-absent mode (expect lower quality "
                        "under thick clouds)")
        return has_s1

    # ---- scenes

    def remove_clouds(
        self,
        s2_cloudy: np.ndarray,
        s1: np.ndarray | None = None,
        cloud_prob: np.ndarray | None = None,
        *,
        steps: int | None = None,
        num_samples: int = 1,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        tile_size: int | None = None,
        overlap: int | None = None,
        keep_clear: float | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Removes clouds from a scene of any size.

        Args:
          s2_cloudy: (H, W, C) float reflectance in [0, 1] (DN / 10000): the model's C bands
            (`band_names`), or all 13 SEN12MS-CR bands, from which the model's are taken.
          s1: (H, W, 2) Sentinel-1 VV, VH normalised to [0, 1] (dB clipped to [-25, 0]); None runs the
            degraded SAR-absent mode (with a warning). Non-finite values are filled with 0 (-25 dB).
          cloud_prob: (H, W, 1) or (H, W) in [0, 1]; None computes it with s2cloudless (needs all 13 bands).
          steps, guidance_scale: default to the bundle's sampling defaults; num_samples: K samples for the
            mean and the std; seed: noise seed; batch_size: tiles per device batch (rounded up to a multiple
            of the device count); tile_size, overlap: tiling (defaults from the bundle: the training crop
            size and an eighth of it); keep_clear: pixels whose cloud probability is below it are returned
            exactly as they came in (std 0); None (default) keeps the model's output everywhere.
        Returns:
          (clear, std): (H, W, C) float32, the cloud-free estimate in [0, 1] and the per-pixel std over the K
          samples (zeros for K = 1).
        """
        s2, s1, prob = self.check_inputs(s2_cloudy, s1, cloud_prob)
        h, w = s2.shape[:2]
        tile, overlap = self.check_tiling(tile_size, overlap)
        layout = TileLayout(h, w, tile, overlap)
        use_sar = self.use_sar(s1 is not None)
        scene = {"s2_cloudy": s2, "cloud_prob": prob} | ({"s1": s1} if use_sar else {})
        scene = {k: pad_to(v, layout.padded_height, layout.padded_width) for k, v in scene.items()}
        clear = np.empty((h, w, s2.shape[-1]), np.float32)
        std = np.empty_like(clear)

        def write(y0: int, y1: int, mean: np.ndarray, sd: np.ndarray) -> None:
            clear[y0:y1], std[y0:y1] = mean, sd

        self.process(layout, lambda y0, y1: {k: v[y0:y1] for k, v in scene.items()}, write,
                     steps=steps, num_samples=num_samples, guidance_scale=guidance_scale, seed=seed,
                     batch_size=batch_size, keep_clear=keep_clear, progress=progress)
        if keep_clear is not None:  # exact: blending identical tile values can differ from them in the last ulp
            clear, std = keep_clear_pixels(clear, std, s2, prob, keep_clear)
        return clear, std

    def process(
        self,
        layout: TileLayout,
        read_rows: ReadRows,
        write_rows: WriteRows,
        *,
        steps: int | None = None,
        num_samples: int = 1,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        keep_clear: float | None = None,
        progress: bool = False,
    ) -> None:
        """`blend_tiles` with this model: the streaming core of `remove_clouds` and of GeoTIFF prediction."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_keep_clear(keep_clear)

        def predict(tiles: Arrays, ids: np.ndarray):
            return self.predict_tiles(tiles, ids, steps=steps, num_samples=num_samples,
                                      guidance_scale=guidance_scale, seed=seed, pad_batch_to=batch_size,
                                      keep_clear=keep_clear)

        blend_tiles(layout, read_rows, predict, write_rows, batch_size=batch_size, progress=progress)

    def check_inputs(
        self, s2_cloudy: np.ndarray, s1: np.ndarray | None, cloud_prob: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Validated float32 (s2 with the model's bands, s1 or None, cloud_prob (H, W, 1))."""
        s2 = np.asarray(s2_cloudy, np.float32)
        if s2.ndim != 3:
            raise ValueError(f"s2_cloudy must be (H, W, C), got shape {s2.shape}")
        h, w, c = s2.shape
        if c not in (self.num_bands, 13):
            raise ValueError(
                f"s2_cloudy has {c} bands; the model uses {self.num_bands} ({', '.join(self.band_names)}) "
                "or pass all 13 SEN12MS-CR bands"
            )
        check_reflectance("s2_cloudy", s2)
        all_bands = s2 if c == 13 else None
        if c != self.num_bands:
            s2 = s2[..., list(self.band_indices)]
        if cloud_prob is None:
            if all_bands is None:
                raise ValueError(
                    "cloud_prob is required: s2cloudless needs all 13 bands and s2_cloudy has only the "
                    f"model's {c}; pass cloud_prob or all 13 bands"
                )
            from crrf_jax.data import cloudprob

            prob = cloudprob.cloud_probability(all_bands[None])[0]
        else:
            prob = np.asarray(cloud_prob, np.float32)
            prob = prob[..., None] if prob.ndim == 2 else prob
            if prob.shape != (h, w, 1):
                raise ValueError(f"cloud_prob must be ({h}, {w}, 1) like s2_cloudy, got shape {prob.shape}")
            check_reflectance("cloud_prob", prob)
        if s1 is not None:
            s1 = np.asarray(s1, np.float32)
            if s1.shape != (h, w, 2):
                raise ValueError(f"s1 must be ({h}, {w}, 2) (VV, VH in [0, 1]) got {s1.shape}")
            bad = ~np.isfinite(s1)
            if bad.any():
                log.warning("s1: %d non-finite values filled with 0 (-25 dB)", int(bad.sum()))
                s1 = np.where(bad, 0.0, s1).astype(np.float32)
            check_reflectance("s1", s1)
        return s2, s1, prob


def check_keep_clear(threshold: float | None) -> None:
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"keep_clear must be a cloud probability in [0, 1], got {threshold}")


def keep_clear_pixels(
    mean: np.ndarray, std: np.ndarray, cloudy: np.ndarray, cloud_prob: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) with the pixels whose cloud probability is below `threshold` taken from `cloudy` (std 0).

    mean, std, cloudy: (..., H, W, C); cloud_prob: (..., H, W, 1) in [0, 1].
    """
    check_keep_clear(threshold)
    keep = np.asarray(cloud_prob) < threshold
    return np.where(keep, cloudy, mean).astype(np.float32), np.where(keep, 0.0, std).astype(np.float32)


def check_reflectance(name: str, x: np.ndarray, tolerance: float = 1e-3) -> None:
    """ValueError unless `x` is finite and within [0, 1] (up to `tolerance`)."""
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < -tolerance or hi > 1 + tolerance:
        hint = " (digital numbers? divide S2 DN by 10000)" if hi > 2 else ""
        raise ValueError(f"{name} must be normalised to [0, 1], found values in [{lo:.4g}, {hi:.4g}]{hint}")


def predict_scene(
    remover: CloudRemover, s2_path, s1_path=None, cloud_prob_path=None, **kwargs
) -> dict[str, Any]:
    """Cloud removal on GeoTIFF files: `crrf_jax.predict.predict_scene` (which holds the file handling)."""
    from crrf_jax import predict

    return predict.predict_scene(remover, s2_path, s1_path, cloud_prob_path, **kwargs)
