"""Cloud removal on whole scenes: `CloudRemover`, trained networks ready for prediction.

- `CloudRemover.from_bundle(path)` (crrf_jax.bundle) or `.from_workdir(workdir)` (crrf_jax.rundir) loads the
  networks, replicated over a ('data',) mesh of every device (of every process under jax.distributed).
- `remove_clouds(s2_cloudy, s1, ...)` on scenes of any size: overlapping tiles (crrf_jax.tiling), batched over
  the mesh, sampled with crrf_jax.sampling and blended so seams do not show. `process` is the streaming core
  that crrf_jax.predict runs on GeoTIFFs.
- `check_reflectance`, `keep_clear_pixels`: input checks and the keep-clear option.

With several processes every process makes the same calls with the same tiles: each feeds the slices of
its own devices (`parallel.put_global`), the prediction is gathered back to every process
(`parallel.to_host`), and the callers write files from process 0 only (crrf_jax.predict, evaluation).

Noise is drawn per tile from `fold_in(key(seed), tile index)`, so a result depends on the seed and the tile
layout but not on the batch size or the number of devices.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import numpy as np

from crrf_jax import bundle, parallel, rundir, sampling, temporal
from crrf_jax import flow as rf
from crrf_jax.data import contract
from crrf_jax.tiling import Arrays, PendingTiles, ReadRows, TileLayout, WriteRows, blend_tiles, pad_to

log = logging.getLogger(__name__)

# A tile whose SAR footprint covers less than this share of its pixels runs the SAR-absent mode (a SAR image
# reprojected from another grid, or partly outside the scene: crrf_jax/scene/s1.py).
SAR_COVERAGE = 0.99


@functools.partial(jax.jit, static_argnums=0)
def _tile_keys(seed: int, ids: jax.Array) -> jax.Array:
    """The noise key of each tile: fold_in(key(seed), tile id). Jitted (once per seed), so a batch costs one
    dispatch, not a vmap traced and run op by op at every call."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(ids)


class CloudRemover:
    """Trained networks ready for prediction, replicated over a mesh whose ('data', 'fsdp') axes batch tiles.

    Build with `from_bundle(path)` (an exported bundle; no training config needed) or `from_workdir(workdir)`
    (a finished training run). `config` is the bundle config (bundle.bundle_config).
    Tiles are host arrays split over the mesh; with several processes (jax.distributed) every process calls
    alike with the same tiles, feeds its own devices' part and gets the whole prediction back.
    """

    def __init__(self, flow_model, vae_s2, vae_s1, config: dict[str, Any], *, mesh=None, refiner=None):
        self.config = config
        self.mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
        nets = sampling.Networks.of(flow_model, vae_s2, vae_s1, refiner)
        self.nets = jax.device_put(nets, parallel.replicated(self.mesh))
        self.spec = rf.FlowSpec.from_config(config["sampling"])
        self.tile_multiple = vae_s2.config.downsample_factor * 2  # latent 2x2 patches
        self.num_bands = vae_s2.config.in_channels

    # ---- construction

    @classmethod
    def from_parts(cls, parts, *, mesh=None, dtype: str | None = None) -> CloudRemover:
        """From bundle.ModelParts (weights as host arrays); `dtype` overrides the compute dtype."""
        modules = {
            name: bundle.fill_state(bundle.abstract_network(parts.config, name, dtype), parts.states[name],
                                    f"{parts.source} ({name})")
            for name in parts.states
        }
        for name in parts.latent_stats:
            modules[name].set_latent_stats(**parts.latent_stats[name])
        return cls(modules["flow"], modules["vae_s2"], modules.get("vae_s1"), parts.config, mesh=mesh,
                   refiner=modules.get("refiner"))

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, mesh=None, dtype: str | None = None) -> CloudRemover:
        """From a bundle directory (python -m crrf_jax.export), weights replicated over `mesh` (default: all
        local devices); BundleError naming the file when one is missing or wrong."""
        return cls.from_parts(bundle.read_bundle(path), mesh=mesh, dtype=dtype)

    @classmethod
    def from_workdir(
        cls, workdir: str | os.PathLike, config=None, *, mesh=None, dtype: str | None = None
    ) -> CloudRemover:
        """From a finished training run; `config` defaults to the run's saved `<workdir>/config.json`."""
        return cls.from_parts(rundir.read_workdir(workdir, config), mesh=mesh, dtype=dtype)

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
    def cloud_score(self) -> dict[str, Any]:
        """How the model's cloud probability is made when none is given: {"kind": "s2cloudless"} (all 13
        bands), or {"kind": "rgbn", "reflectance_scale": s} (`cloudprob.rgbn_cloud_score` of B04, B03, B02,
        B08: the 4-band benchmarks). Bundles without the entry were all trained with s2cloudless."""
        return dict(self.config.get("cloud_score", {"kind": "s2cloudless"}))

    def compute_cloud_prob(self, images: np.ndarray, band_names) -> np.ndarray:
        """(..., H, W, C) reflectance of `band_names` -> (..., H, W, 1) float32: the model's cloud score."""
        from crrf_jax.data import cloudprob

        names, score = tuple(band_names), self.cloud_score
        if score["kind"] == "rgbn":
            rgbn = ("B04", "B03", "B02", "B08")
            if not set(rgbn) <= set(names):
                raise ValueError(f"the model's cloud score needs {', '.join(rgbn)}; the image has {', '.join(names)}")
            return cloudprob.rgbn_cloud_score(images[..., [names.index(b) for b in rgbn]],
                                              score.get("reflectance_scale", 1.0))
        if names != tuple(contract.S2_BANDS):
            raise ValueError("cloud_prob is required: s2cloudless needs all 13 bands and the image has only "
                             f"{len(names)} ({', '.join(names)}); pass cloud_prob or all 13 bands")
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        return cloudprob.cloud_probability(flat).reshape(*lead, *images.shape[-3:-1], 1)

    @property
    def max_dates(self) -> int:
        """The most cloudy dates of one scene the model takes (1: a single-image model)."""
        return int(self.config["model"].get("max_dates", 1))

    @property
    def num_devices(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def platform(self) -> str:
        """What the mesh's devices are: "cpu", "gpu", "tpu"."""
        return self.mesh.devices.flat[0].platform

    # ---- tiles

    def predict_tiles(self, tiles: Arrays, tile_ids: np.ndarray, **options
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """Samples a batch of tiles on the mesh and waits for it: `submit_tiles(tiles, tile_ids, **options)()`,
        host (mean clipped to [0, 1], std: None with with_std=False), each (n, T, T, C) float32."""
        return self.submit_tiles(tiles, tile_ids, **options)()

    def submit_tiles(
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
        samples_per_pass: int = 1,
        dates: int | None = None,
        with_std: bool = True,
    ) -> PendingTiles:
        """Submits a batch of tiles to the mesh and returns at once (JAX dispatches asynchronously), so the host
        can prepare and finish other batches while the devices sample this one.

        tiles: "s2_cloudy" (n, T, T, C), "cloud_prob" (n, T, T, 1), optionally "s1" (n, T, T, 2), all in
        [0, 1], and with "s1" optionally "s1_coverage" (n, T, T) bool, where the SAR footprint covers each
        pixel: a tile less than `SAR_COVERAGE` covered runs the SAR-absent mode (the model's null SAR tokens)
        instead of seeing filled values; tile_ids (n,) ints seeding each tile's noise (with `seed`). The batch is padded to
        `pad_batch_to` (default n) rounded up to a multiple of the device count, so every batch of a scene
        compiles once. output, drop_cloudy: see `sampling.sample_patches`. keep_clear: pixels whose cloud
        probability is below it come back as they came in (std 0); None keeps the model's output everywhere.
        samples_per_pass: how many of the K samples run at once as extra batch rows
        (`sampling.sample_patches`; more fills a large device better, at that many times the activation
        memory; the same result). dates: D cloudy dates of a multi-temporal scene, stacked date-major along
        the channel axis of every input (s2_cloudy (n, T, T, D * C), cloud_prob (n, T, T, D), s1
        (n, T, T, D * 2), as `remove_clouds` tiles them); keep_clear then keeps the least-cloudy date's pixel.
        with_std=False: the std stays on the devices (the call returns None for it): less to copy and blend
        where no uncertainty is wanted. Returns a call that waits for the batch and returns host (mean clipped
        to [0, 1], std), each (n, T, T, C) float32. With several processes the waits are collectives: every
        process waits for its batches in the order it submitted them.
        """
        if dates is not None:
            tiles = dict(tiles) | {k: unstack_dates(tiles[k], dates) for k in ("s2_cloudy", "cloud_prob", "s1")
                                   if tiles.get(k) is not None}
        steps = int(steps or self.config["sampling"]["steps"])
        check_samples(num_samples, samples_per_pass)
        default_guidance = self.config["sampling"]["guidance_scale"]
        guidance = float(default_guidance if guidance_scale is None else guidance_scale)
        n = int(tile_ids.shape[0])
        size = -(-max(n, pad_batch_to or 0) // self.num_devices) * self.num_devices
        names = ["s2_cloudy", "cloud_prob"] + (["s1"] if tiles.get("s1") is not None else [])

        def put(a: np.ndarray) -> jax.Array:
            a = np.asarray(a)
            if size > n:
                a = np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)])
            return parallel.put_global(a, parallel.batch_sharding(self.mesh, a.ndim))

        device = {k: put(np.asarray(tiles[k], np.float32)) for k in names}
        ids = put(np.asarray(tile_ids, np.uint32))
        keys = _tile_keys(int(seed), ids)
        drop_sar = None
        if "s1" in names and tiles.get("s1_coverage") is not None:
            covered = np.asarray(tiles["s1_coverage"], bool).reshape(n, -1).mean(axis=1)
            drop_sar = put(covered < SAR_COVERAGE)
        mean, std = sampling.sample_patches_jit(
            self.nets, device["s2_cloudy"], device.get("s1"), device["cloud_prob"], keys,
            steps=steps, num_samples=int(num_samples), guidance_scale=guidance, spec=self.spec,
            output=output, drop_cloudy=bool(drop_cloudy), drop_sar=drop_sar,
            samples_per_pass=min(int(samples_per_pass), int(num_samples)),
        )

        def wait() -> tuple[np.ndarray, np.ndarray | None]:
            host_mean = np.clip(parallel.to_host(mean)[:n], 0.0, 1.0)
            host_std = parallel.to_host(std)[:n] if with_std else None
            if keep_clear is not None:
                cloudy, prob, _ = (np.asarray(a) for a in temporal.single_view(tiles["s2_cloudy"],
                                                                                tiles["cloud_prob"]))
                host_mean, host_std = keep_clear_pixels(host_mean, host_std, cloudy, prob, keep_clear)
            return host_mean, host_std

        return wait

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
        samples_per_pass: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Removes clouds from a scene of any size.

        Args:
          s2_cloudy: (H, W, C) float reflectance in [0, 1] (DN / 10000): the model's C bands
            (`band_names`), or all 13 SEN12MS-CR bands, from which the model's are taken. Or (D, H, W, C):
            D cloudy dates of the scene in chronological order, D <= `max_dates` (then s1 and cloud_prob
            carry the same leading D: one per date).
          s1: (H, W, 2) Sentinel-1 VV, VH normalised to [0, 1] (dB clipped to [-25, 0]); None runs the
            degraded SAR-absent mode (with a warning). Non-finite values are filled with 0 (-25 dB).
          cloud_prob: (H, W, 1) or (H, W) in [0, 1]; None computes it with s2cloudless (needs all 13 bands).
          steps, guidance_scale: default to the bundle's sampling defaults; num_samples: K samples for the
            mean and the std; seed: noise seed; batch_size: tiles per device batch (rounded up to a multiple
            of the device count); tile_size, overlap: tiling (defaults from the bundle: the training crop
            size and an eighth of it); keep_clear: pixels whose cloud probability is below it are returned
            exactly as they came in (std 0); None (default) keeps the model's output everywhere.
          samples_per_pass: K samples run this many at a time as extra batch rows (see `predict_tiles`).
        Returns:
          (clear, std): (H, W, C) float32, the cloud-free estimate in [0, 1] and the per-pixel std over the K
          samples (zeros for K = 1).
        """
        s2, s1, prob, dates = self.check_dates(s2_cloudy, s1, cloud_prob)
        h, w = s2.shape[:2]
        tile, overlap = self.check_tiling(tile_size, overlap)
        layout = TileLayout(h, w, tile, overlap)
        use_sar = self.use_sar(s1 is not None)
        scene = {"s2_cloudy": s2, "cloud_prob": prob} | ({"s1": s1} if use_sar else {})
        scene = {k: pad_to(v, layout.padded_height, layout.padded_width) for k, v in scene.items()}
        clear = np.empty((h, w, self.num_bands), np.float32)
        std = np.zeros_like(clear)  # one sample: zeros, not brought back from the devices

        def write(y0: int, y1: int, mean: np.ndarray, sd: np.ndarray | None) -> None:
            clear[y0:y1] = mean
            if sd is not None:
                std[y0:y1] = sd

        self.process(layout, lambda y0, y1: {k: v[y0:y1] for k, v in scene.items()}, write,
                     steps=steps, num_samples=num_samples, guidance_scale=guidance_scale, seed=seed,
                     batch_size=batch_size, keep_clear=keep_clear, progress=progress,
                     samples_per_pass=samples_per_pass, dates=dates, with_std=num_samples > 1)
        if keep_clear is not None:  # exact: blending identical tile values can differ from them in the last ulp
            s2, prob = (s2, prob) if dates is None else (unstack_dates(s2[None], dates)[0],
                                                         unstack_dates(prob[None], dates)[0])
            cloudy, prob, _ = (np.asarray(a) for a in temporal.single_view(s2[None], prob[None]))
            clear, std = keep_clear_pixels(clear, std, cloudy[0], prob[0], keep_clear)
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
        samples_per_pass: int = 1,
        dates: int | None = None,
        with_std: bool = True,
    ) -> None:
        """`blend_tiles` with this model: the streaming core of `remove_clouds` and of GeoTIFF prediction.
        dates: the scene's rows hold that many dates stacked along the channels (`predict_tiles`);
        with_std=False: `write_rows` gets None for the std (`submit_tiles`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_samples(num_samples, samples_per_pass)
        check_keep_clear(keep_clear)

        def predict(tiles: Arrays, ids: np.ndarray) -> PendingTiles:
            return self.submit_tiles(tiles, ids, steps=steps, num_samples=num_samples,
                                      guidance_scale=guidance_scale, seed=seed, pad_batch_to=batch_size,
                                      keep_clear=keep_clear, samples_per_pass=samples_per_pass, dates=dates,
                                      with_std=with_std)

        blend_tiles(layout, read_rows, predict, write_rows, batch_size=batch_size, progress=progress)

    def check_dates(
        self, s2_cloudy: np.ndarray, s1: np.ndarray | None, cloud_prob: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int | None]:
        """`check_inputs` of a single image, or of each of D dates ((D, H, W, C) inputs): then the dates come
        back stacked date-major along the channels ((H, W, D * C), as `predict_tiles` takes them) with D."""
        s2_cloudy = np.asarray(s2_cloudy)
        if s2_cloudy.ndim != 4:
            return (*self.check_inputs(s2_cloudy, s1, cloud_prob), None)
        dates = s2_cloudy.shape[0]
        if not 1 <= dates <= self.max_dates:
            raise ValueError(f"s2_cloudy holds {dates} dates; this model takes 1 to max_dates={self.max_dates}")
        for name, x in (("s1", s1), ("cloud_prob", cloud_prob)):
            if x is not None and len(x) != dates:
                raise ValueError(f"{name} must have one entry per date ({dates}), got shape {np.shape(x)}")
        checked = [self.check_inputs(s2_cloudy[d], None if s1 is None else s1[d],
                                     None if cloud_prob is None else cloud_prob[d]) for d in range(dates)]
        s2, sar, prob = (None if parts[0] is None else np.concatenate(parts, axis=-1) for parts in zip(*checked))
        return s2, sar, prob, dates

    def check_inputs(
        self, s2_cloudy: np.ndarray, s1: np.ndarray | None, cloud_prob: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Validated float32 (s2 with the model's bands, s1 or None, cloud_prob (H, W, 1))."""
        s2 = np.asarray(s2_cloudy, np.float32)
        if s2.ndim != 3:
            raise ValueError(f"s2_cloudy must be (H, W, C), got shape {s2.shape}")
        h, w, c = s2.shape
        if c not in (self.num_bands, len(contract.S2_BANDS)):
            raise ValueError(
                f"s2_cloudy has {c} bands; the model uses {self.num_bands} ({', '.join(self.band_names)}) "
                "or pass all 13 SEN12MS-CR bands"
            )
        check_reflectance("s2_cloudy", s2)
        all_bands = s2 if c == len(contract.S2_BANDS) else None
        if c != self.num_bands:
            s2 = s2[..., list(self.band_indices)]
        if cloud_prob is None:
            given = (all_bands, contract.S2_BANDS) if all_bands is not None else (s2, self.band_names)
            prob = self.compute_cloud_prob(*given)
        else:
            prob = np.asarray(cloud_prob, np.float32)
            prob = prob[..., None] if prob.ndim == 2 else prob
            if prob.shape != (h, w, 1):
                raise ValueError(f"cloud_prob must be ({h}, {w}, 1) like s2_cloudy, got shape {prob.shape}")
            check_reflectance("cloud_prob", prob)
        if s1 is not None:
            s1 = np.asarray(s1, np.float32)
            if s1.shape != (h, w, len(contract.S1_BANDS)):
                raise ValueError(f"s1 must be ({h}, {w}, 2) (VV, VH in [0, 1]) got {s1.shape}")
            bad = ~np.isfinite(s1)
            if bad.any():
                log.warning("s1: %d non-finite values filled with 0 (-25 dB)", int(bad.sum()))
                s1 = np.where(bad, contract.S1_NONFINITE_FILL, s1).astype(np.float32)
            check_reflectance("s1", s1)
        return s2, s1, prob


def unstack_dates(x: np.ndarray, dates: int) -> np.ndarray:
    """(n, T, T, D * C) tiles with D dates stacked date-major along the channels -> (n, D, T, T, C)."""
    x = np.asarray(x)
    return np.moveaxis(x.reshape(*x.shape[:-1], dates, x.shape[-1] // dates), -2, 1)


def check_samples(num_samples: int, samples_per_pass: int) -> None:
    """num_samples (K) and samples_per_pass (how many of them run at once) must be positive integers."""
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(samples_per_pass) < 1:
        raise ValueError(f"samples_per_pass must be >= 1, got {samples_per_pass}")


def check_keep_clear(threshold: float | None) -> None:
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"keep_clear must be a cloud probability in [0, 1], got {threshold}")


def keep_clear_pixels(
    mean: np.ndarray, std: np.ndarray | None, cloudy: np.ndarray, cloud_prob: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """(mean, std) with the pixels whose cloud probability is below `threshold` taken from `cloudy` (std 0;
    a std of None stays None).

    mean, std, cloudy: (..., H, W, C); cloud_prob: (..., H, W, 1) in [0, 1].
    """
    check_keep_clear(threshold)
    keep = np.asarray(cloud_prob) < threshold
    std = None if std is None else np.where(keep, 0.0, std).astype(np.float32)
    return np.where(keep, cloudy, mean).astype(np.float32), std


def check_reflectance(name: str, x: np.ndarray, tolerance: float = 1e-3) -> None:
    """ValueError unless `x` is finite and within [0, 1] (up to `tolerance`)."""
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < -tolerance or hi > 1 + tolerance:
        hint = " (digital numbers? divide S2 DN by 10000)" if hi > 2 else ""
        raise ValueError(f"{name} must be normalised to [0, 1], found values in [{lo:.4g}, {hi:.4g}]{hint}")
