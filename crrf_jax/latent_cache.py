"""Latents cached once for the flow stage (`config.flow.cache_latents`).

With frozen VAEs, encoding the same patches every epoch is wasted work: the VAE encoders cost about as much as
the transformer at CR_RF's sizes. `build` encodes this process's shard of the training split once (posterior
means, scaled with the measured latent statistics) into NumPy files in `rundir.latent_cache_dir(workdir)`
(`<workdir>/flow/latents/p<process>`):

    x0.npy, cloudy.npy, sar.npy   (N, h, w, 16) float32 latents of target, cloudy image and SAR
    cloud_prob.npy                (N, H, W, 1) uint8, probability x 255 (the cloud CNN's input)
    ids.txt                       one patch id per line
    DONE                          written last: a cache without it is rebuilt

`iterator` serves them through grain (seeded shuffle, repeat, random crop of `crop_size / 8` latent pixels,
flips and 90-degree rotations applied identically to the latents and the cloud map, batching) with a
checkpointable state, like the image pipeline. Its batches carry the cloud map as stored (uint8), which the
train step normalises (`contract.normalize_batch`), as it does the image pipeline's compact batches.
Geometric augmentation in latent space is an approximation (the VAE is not exactly equivariant), the usual
price of a latent cache.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from crrf_jax import sampling, train_lib
from crrf_jax.data import contract
from crrf_jax.data.epoch_shuffle import EpochShuffle
from crrf_jax.data.pipeline import PipelineIterator, apply_flip_rotate

log = logging.getLogger(__name__)

LATENT_KEYS = ("x0", "cloudy", "sar")


def build(directory: str | os.PathLike, batches, vaes: sampling.Networks) -> str:
    """Encodes every valid sample of `batches` (an evaluation-style pass: no shuffle, one epoch) once.

    directory: a local folder (memory-mapped when read; `rundir.latent_cache_dir` keeps it local even for a
    gs:// workdir). vaes: the frozen VAEs (`sampling.Networks.of_vaes`).
    """
    directory = os.fspath(directory)
    if os.path.exists(os.path.join(directory, "DONE")):
        return directory
    os.makedirs(directory, exist_ok=True)
    encode = jax.jit(lambda nets, batch: train_lib.encode_batch(nets, contract.normalize_batch(batch)))
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in (*LATENT_KEYS, "cloud_prob")}
    ids: list[str] = []
    for batch in tqdm(batches, desc="caching latents", unit="batch", dynamic_ncols=True):
        valid = np.asarray(batch.get("mask", np.ones(len(batch["id"]), bool)), bool)
        latents = jax.device_get(encode(vaes, {k: jnp.asarray(batch[k]) for k in ("s2", "s2_cloudy", "s1")}))
        for k in LATENT_KEYS:
            chunks[k].append(np.asarray(latents[k], np.float32)[valid])
        prob = np.asarray(batch["cloud_prob"])[valid]  # kept uint8 x 255, as stored
        chunks["cloud_prob"].append(prob if prob.dtype == np.uint8 else contract.cloud_prob_to_uint8(prob))
        ids.extend(str(i) for i in np.asarray(batch["id"])[valid])
    if not ids:
        raise ValueError(f"{directory}: no training samples to cache")
    for k, parts in chunks.items():
        np.save(os.path.join(directory, f"{k}.npy"), np.concatenate(parts))
    with open(os.path.join(directory, "ids.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    with open(os.path.join(directory, "DONE"), "w") as f:
        f.write(f"{len(ids)}\n")
    log.info("cached the latents of %d patches in %s", len(ids), directory)
    return directory


class LatentSource(grain.sources.RandomAccessDataSource):
    """Random access to one cache directory (memory-mapped, so workers share the pages)."""

    def __init__(self, directory: str):
        if not os.path.exists(os.path.join(directory, "DONE")):
            raise FileNotFoundError(f"{directory}: no complete latent cache (DONE missing)")
        self.directory = directory
        self._arrays = {k: np.load(os.path.join(directory, f"{k}.npy"), mmap_mode="r")
                        for k in (*LATENT_KEYS, "cloud_prob")}

    def __len__(self) -> int:
        return len(self._arrays["x0"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        out = {k: np.asarray(self._arrays[k][index], np.float32) for k in LATENT_KEYS}
        out["cloud_prob"] = np.asarray(self._arrays["cloud_prob"][index])  # uint8: the step normalises it
        return out


class LatentCropFlipRotate(grain.transforms.RandomMap):
    """A random latent crop (and the matching pixel crop of the cloud map), flip and 90-degree rotation."""

    def __init__(self, latent_crop: int, factor: int, augment: bool):
        self.latent_crop, self.factor, self.augment = latent_crop, factor, augment

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        h, w = element["x0"].shape[:2]
        c, f = min(self.latent_crop, h, w), self.factor
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        out = {k: element[k][top : top + c, left : left + c] for k in LATENT_KEYS}
        out["cloud_prob"] = element["cloud_prob"][top * f : (top + c) * f, left * f : (left + c) * f]
        if self.augment:
            turns, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
            out = {k: apply_flip_rotate(v, turns, flip) for k, v in out.items()}
        return out


READ_AHEAD_BATCHES = 4


def iterator(directory: str, *, batch_size: int, crop_size: int, seed: int, factor: int = 8,
             augment: bool = True, worker_count: int = 0, read_threads: int = 1):
    """An endless, shuffled, augmented and checkpointable iterator of cached-latent batches; its state names
    the shuffle's order, as the image pipeline's does (`pipeline.PipelineIterator`).

    Each reading process (this one, or each of `worker_count` workers) assembles batches in `read_threads`
    threads, at most READ_AHEAD_BATCHES ahead of the consumer. grain's default read options hold 500 ahead
    in 16 threads: about 4 GB of host memory a process for batches of 32 256-pixel crops (BENCHMARKS.md
    "Data pipeline").
    """
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=READ_AHEAD_BATCHES)
    dataset = (
        EpochShuffle(grain.MapDataset.source(LatentSource(directory)), seed)
        .repeat(None)
        .random_map(LatentCropFlipRotate(crop_size // factor, factor, augment), seed=seed + 1)
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset(read_options)
    )
    if worker_count:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return PipelineIterator(iter(dataset), shuffled=True)
