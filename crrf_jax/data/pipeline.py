"""Grain input pipelines over SEN12MS-CR and the other benchmarks: shuffle, augment, batch, shard per JAX
process, checkpointable.

The samples come from the datasets' sources (`crrf_jax.data.sources`: for SEN12MS-CR its GeoTIFFs or its
ArrayRecord shards, one source for each other benchmark). `make_dataset(...)` chains one into a grain
pipeline and `iter(...)` of it is a `PipelineIterator`::

    source -> this process's shard -> shuffle(seed) -> repeat(num_epochs) -> read (skip or raise)
      -> random crop / flips / 90-degree rotations (same for every modality) -> batch -> worker processes

Where normalisation happens. Batches stay compact on the host: both SEN12MS-CR sources read S2 as stored
uint16 DN and the cloud probability as stored uint8 x 255, and so do the augmentation, the batch, grain's
worker processes and their shared memory (half the bytes of float32 for S2, a quarter for the cloud map). The
float32 contract is made by `contract.normalize_batch` as the first operation inside the jitted steps
(train_lib.train_step, sampling.sample_patches, the latent encoders), bit-identical to the host conversions it
replaces; host consumers that need floats (evaluation, previews) call it with xp=numpy, or pass
`to_float32=True`. So are the flips and rotations of augmented batches: the host crops, draws each sample's
transform and batches the crops as read; `contract.normalize_batch` applies the transform
(`contract.FLIP_ROTATE`), bit for bit what rotating on the host gave.

Reading processes (this one without workers, every grain worker) keep their patch-sized buffers for reuse
instead of mapping them afresh at every read (`host_memory.keep_large_buffers`).

Batches are dicts: s1 (B, H, W, 2) float32 [0, 1]; s2 and s2_cloudy (B, H, W, C) uint16 DN; cloud_prob
(B, H, W, 1) uint8; id (B,) str; mask (B,) bool, False on padding (evaluation only); with augment,
flip_rotate (B, 2) int8, the transforms still to apply. A float DN GeoTIFF gives
float32 [0, 1] S2 (so does a batch mixing it with uint16 files); `to_float32=True` gives float32 throughout.

The other benchmarks (`dataset`: `sources.DATASETS`) give the same keys, without s1 where the dataset has no
SAR, and with a date axis on s2_cloudy, cloud_prob and s1 where it is multi-temporal: (B, T, H, W, C)
(docs/ARCHITECTURE.md, "Data contract"). A source that draws per read (`needs_rng`: SEN12MS-CR-TS's random
date sampler) is read after the shuffle, with a generator seeded by the element's stream position.

Determinism. Shuffling (`epoch_shuffle.EpochShuffle`: a permutation per epoch, as cheap per element for a
few dozen samples as for a million) and augmentation draw from the seed and the element's position, so a run
is fully determined by (seed, process index and count, worker_count). The iterator's state (`get_state` /
`set_state`, or Orbax through `grain.checkpoint.CheckpointSave` / `CheckpointRestore`) is small JSON; a
restored iterator yields exactly the batches the uninterrupted one would. Restore with the same
worker_count: with workers, each batch is assembled inside one worker, so batch composition depends on
their number.

Sharding. Process p of P (default `jax.process_index()`, `jax.process_count()`) takes elements p, p+P, ...
For training (drop_remainder) every process gets floor(N / P) of them, so all step together. For evaluation
(no drop_remainder) every process gets ceil(N / P) elements, short shards padded with masked zero samples,
and the last batch is padded likewise: every element is seen exactly once with mask True.

Bad samples. on_error="raise" stops with the `DataError` naming the file. on_error="skip" drops the sample,
logs a warning naming it (in the main process) and counts it in `iterator.bad_samples` (a `BadSampleLog`;
`iterator.bad_sample_count` survives checkpoints). A bad sample in a final partial batch that
drop_remainder throws away is logged where it is read, but not counted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from grain.python import SharedMemoryArray

from crrf_jax.data import contract, host_memory, shm_slots, sources
from crrf_jax.data.contract import ARRAY_KEYS, DataError, array_keys
from crrf_jax.data.epoch_shuffle import EpochShuffle
from crrf_jax.data.sen12mscr import BadSampleLog

logger = logging.getLogger(__name__)

_BAD = "_bad"  # key of a bad-sample marker: (id, path, reason)
_SKIPPED = "_skipped"  # batch key carrying the markers met while assembling it
SHUFFLE_ORDER = "epoch_shuffle/1"  # the iterator state's name for the order `EpochShuffle` draws


# -------------------------------------------------------------------------------------------- reading a shard


class _ShardReader:
    """This process's shard of a source: element i reads source[indices[i]]; elements past the shard are
    masked zero samples shaped like its first element (evaluation padding). Bad samples become markers with
    on_error="skip" (a padding element whose template is bad is left out: it is no sample).

    With `cache`, each element is read once and then served from memory, its arrays read-only (the transforms
    after it make views and copies, never writes).
    """

    def __init__(self, source, indices: Sequence[int], length: int, on_error: str, cache: bool = False):
        if cache and getattr(source, "needs_rng", False):
            raise ValueError(f"{source!r}: cache=True would keep each sample's first random draw; this source "
                             "draws afresh at every read (leave data.cache off)")
        self.source, self.indices, self.length, self.on_error = source, list(indices), length, on_error
        self.cache = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cache is None:
            return self.read(index)
        if index not in self.cache:  # grain's read threads may both read it once: the same sample either way
            sample = self.read(index)
            for value in sample.values():
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
            self.cache[index] = sample
        return self.cache[index]

    def read(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Element `index`; `rng` goes to sources that draw per read (`needs_rng`: SEN12MS-CR-TS's random date
        sampler), so that each epoch draws afresh."""
        padding = index >= len(self.indices)
        position = self.indices[0 if padding else index]
        try:
            sample = self.source.read(position, rng) if rng is not None else self.source[position]
        except DataError as err:
            if self.on_error == "raise":
                raise
            if padding:
                return {_BAD: None}
            sample_id = _sample_id(self.source, position)
            logger.debug("bad sample %s: %s", sample_id, err)
            return {_BAD: (sample_id, err.path, err.reason)}
        sample = {**sample, "id": np.str_(sample["id"]), "mask": np.bool_(not padding)}
        if padding:
            sample = {k: (np.zeros_like(v) if k in ARRAY_KEYS else v) for k, v in sample.items()}
            sample["id"] = np.str_("")
        return sample


def _sample_id(source, position: int) -> str:
    items = getattr(source, "triplets", None) or getattr(source, "items", None)
    return items[position].id if items is not None else f"{source!r}[{position}]"


class _ReadWithRng:
    """map_with_index transform of the element indices: reads element i of a shard with a generator seeded by
    (seed, i), i the position in the shuffled, repeated stream, so a sample draws anew each epoch and a
    restored iterator draws what the uninterrupted one would."""

    def __init__(self, reader: _ShardReader, seed: int):
        self.reader, self.seed = reader, int(seed)

    def __call__(self, index: int, element: int) -> dict[str, Any]:
        return self.reader.read(int(element), np.random.default_rng([self.seed, 17, int(index)]))


# ----------------------------------------------------------------------------------------------- augmentation


class RandomCropFlipRotate(grain.transforms.RandomMap):
    """Random crop to crop_size, then (augment) a random 90-degree rotation and horizontal flip.

    The same window and transform apply to every array of the sample (s1, s2, s2_cloudy, cloud_prob, those it
    has), so the modalities stay co-registered; multi-temporal arrays (T, H, W, C) get it on every date alike
    (the T axis untouched). Rotations by 90/270 degrees only for square images. The crop is a view here; the
    rotation and flip are drawn here but applied with the rest of the data contract, on the device
    (`contract.FLIP_ROTATE`, applied by `contract.normalize_batch`), so the batch copies the crops as read.
    """

    def __init__(self, crop_size: int | None, augment: bool):
        self.crop_size, self.augment = crop_size, augment

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if _BAD in element:
            return element
        arrays = {k: element[k] for k in array_keys(element)}
        height, width = arrays["s2"].shape[:2]
        if self.crop_size is not None:
            if self.crop_size > min(height, width):
                raise ValueError(
                    f"crop_size {self.crop_size} exceeds the {height}x{width} sample {element['id']}"
                )
            top = int(rng.integers(0, height - self.crop_size + 1))
            left = int(rng.integers(0, width - self.crop_size + 1))
            window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
            arrays = {k: v[(slice(None),) * (v.ndim - 3) + window] for k, v in arrays.items()}
            height = width = self.crop_size
        if self.augment:
            turns = int(rng.integers(0, 4)) if height == width else 2 * int(rng.integers(0, 2))
            flip = bool(rng.integers(0, 2))
            return {**element, **arrays, contract.FLIP_ROTATE: np.array([turns, flip], np.int8)}
        return {**element, **arrays}


def apply_flip_rotate(image: np.ndarray, turns: int, flip: bool, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """(H, W, C) image rotated by turns x 90 degrees counter-clockwise, then mirrored left-right if flip; `axes`
    are the (row, column) axes ((1, 2) for a (T, H, W, C) stack of dates)."""
    out = np.rot90(image, turns, axes=axes)
    return np.flip(out, axes[1]) if flip else out


# --------------------------------------------------------------------------------------------------- batching


class _BatchSkippingBad(grain.IterDataset):
    """Batches elements, leaving out bad-sample markers and listing them under `_skipped`.

    Each array keeps its samples' stored dtype (compact); samples of one key in different dtypes (a float DN
    GeoTIFF among uint16 ones) are all normalised to float32. With pad (evaluation) a final partial batch is
    filled with masked zeros up to batch_size. Inside grain workers the batch is written straight into shared
    memory (no copy on the way to the main process): into a reused slot of the worker's `shm_slots.SlotPool`
    of up to `max_slots`, or where none is free (or off Linux) into grain's fresh segments.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool, pad: bool,
                 max_slots: int = 0):
        super().__init__(parent)
        self.batch_size, self.drop_remainder, self.pad = batch_size, drop_remainder, pad
        self.max_slots = max_slots
        self.shared_memory = False

    def enable_shared_memory_output(self) -> None:
        self.shared_memory = True

    def __iter__(self):
        return _BatchSkippingBadIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"BatchSkippingBad(batch_size={self.batch_size}, drop_remainder={self.drop_remainder})"


class _BatchSkippingBadIterator(grain.DatasetIterator):
    def __init__(self, parent, options: _BatchSkippingBad):
        super().__init__(parent)
        self.batch_size, self.drop_remainder, self.pad = (
            options.batch_size,
            options.drop_remainder,
            options.pad,
        )
        self.shared_memory = options.shared_memory
        self._slots = None  # the worker's SlotPool, made on its first batch
        self._max_slots = options.max_slots if shm_slots.available() else 0
        self._template: dict[str, tuple] | None = None  # shape and dtype of each array, for padding

    def __next__(self) -> dict[str, Any]:
        values, skipped = [], []
        while len(values) < self.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            if _BAD in element:
                if element[_BAD] is not None:  # None: a padding element that could not be made
                    skipped.append(element[_BAD])
            else:
                values.append(element)
        if len(values) < self.batch_size and (self.drop_remainder or not (values or skipped)):
            for sample_id, path, reason in skipped:  # nobody downstream will see them: log here
                logger.warning(
                    "skipping bad sample %s: %s: %s (in a dropped final batch)", sample_id, path, reason
                )
            raise StopIteration
        if values:
            self._template = {k: (values[0][k].shape, values[0][k].dtype) for k in array_keys(values[0])}
        if len(values) < self.batch_size and self.pad:
            if self._template is None:
                raise DataError(skipped[0][1], "every sample of the evaluation pass is bad")
            filler = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self._template.items()}
            filler.update(id=np.str_(""), mask=np.bool_(False))
            if contract.FLIP_ROTATE in values[0]:
                filler[contract.FLIP_ROTATE] = np.zeros(2, np.int8)
            values += [filler] * (self.batch_size - len(values))
        batch = self._assemble(values) if values else {}
        batch[_SKIPPED] = [list(entry) for entry in skipped]
        return batch

    def _assemble(self, values: list[dict[str, Any]]) -> dict[str, Any]:
        specs = {}  # key -> (batch shape, dtype, mixed)
        for key in array_keys(values[0]):  # datasets without SAR have no s1
            shape, dtype = values[0][key].shape, values[0][key].dtype
            for value in values:
                if value[key].shape != shape:
                    raise ValueError(
                        f"sample {value['id']}: {key} has shape {value[key].shape} but {values[0]['id']} has "
                        f"{shape}; patches of different sizes need a crop_size"
                    )
            mixed = any(v[key].dtype != dtype for v in values)
            specs[key] = ((len(values), *shape), np.dtype(np.float32) if mixed else dtype, mixed)
        slot = self._lease(specs) if self.shared_memory else None
        batch = {}
        for key, (shape, dtype, mixed) in specs.items():
            if slot is not None:
                out, batch[key] = slot.array(shape, dtype)  # the batch carries the slot's reference
            else:
                out = batch[key] = (SharedMemoryArray if self.shared_memory else np.empty)(shape, dtype)
            for i, value in enumerate(values):
                item = contract.normalize_array(key, value[key], np) if mixed else value[key]
                np.copyto(out[i], item, casting="no")
        batch["id"] = np.array([str(v["id"]) for v in values])
        batch["mask"] = np.array([bool(v["mask"]) for v in values])
        if contract.FLIP_ROTATE in values[0]:
            batch[contract.FLIP_ROTATE] = np.stack([v[contract.FLIP_ROTATE] for v in values])
        return batch

    def _lease(self, specs: dict[str, tuple]) -> shm_slots.Slot | None:
        if not self._max_slots:
            return None
        if self._slots is None:
            self._slots = shm_slots.make_pool(self._max_slots)
            if self._slots is None:
                self._max_slots = 0
                return None
        return self._slots.lease([(shape, dtype) for shape, dtype, _ in specs.values()])

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _CountBadSamples(grain.IterDataset):
    """Outermost stage, in the main process: turns `_skipped` lists into log lines and a count (and with
    to_float32 normalises on the host)."""

    def __init__(self, parent: grain.IterDataset, to_float32: bool):
        super().__init__(parent)
        self.to_float32 = to_float32
        self.shuffled = False  # set by make_dataset

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(self._parent.__iter__(), self.to_float32, self.shuffled)


class PipelineIterator(grain.DatasetIterator):
    """Iterator over batches; checkpointable with `get_state()` / `set_state()` (JSON-serialisable dicts).

    `bad_samples`: a BadSampleLog of the samples skipped since this iterator was made;
    `bad_sample_count`: all skipped so far, including before a restore. The state names the shuffle's order
    (`SHUFFLE_ORDER`); a shuffled pipeline restored from a state without it (written before `epoch_shuffle`,
    or by the latent cache before it named its order) warns that the rest of that epoch may follow another
    order. A bare grain state (the latent cache's, before it was wrapped in this) restores as the parent's.
    """

    def __init__(self, parent: grain.DatasetIterator, to_float32: bool = False, shuffled: bool = False):
        super().__init__(parent)
        self.to_float32, self.shuffled = to_float32, shuffled
        self.bad_samples = BadSampleLog(logger)
        self._skipped_before = 0
        self._slots = shm_slots.SlotReader()  # batches in the grain workers' reused shared memory

    @property
    def bad_sample_count(self) -> int:
        return self._skipped_before + self.bad_samples.count

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self._parent))
        for sample_id, path, reason in batch.pop(_SKIPPED, []):
            self.bad_samples.record(str(sample_id), DataError(str(path), str(reason)))
        if not batch:  # every element of the last batch was bad
            raise StopIteration
        batch = {k: np.asarray(v) for k, v in self._slots.open(batch).items()}
        return contract.normalize_batch(batch, np) if self.to_float32 else batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "bad_sample_count": self.bad_sample_count,
                "shuffle": SHUFFLE_ORDER}

    def set_state(self, state: dict[str, Any]) -> None:
        if self.shuffled and state.get("shuffle") != SHUFFLE_ORDER:
            named = state.get("shuffle")
            logger.warning(
                "restoring a data-iterator state written with %s, not %s: the rest of its epoch follows this "
                "pipeline's order, so some of that epoch's samples may come twice and others not until the "
                "next epoch", f"another shuffle ({named})" if named else
                "another shuffle or none named (code before crrf_jax's epoch_shuffle shuffled with grain's)",
                SHUFFLE_ORDER)
        self._parent.set_state(state["pipeline"] if "pipeline" in state else state)
        self.bad_samples = BadSampleLog(logger)
        self._skipped_before = int(state.get("bad_sample_count", 0))


# ----------------------------------------------------------------------------------------------- the pipeline


def shard_indices(n: int, process_index: int, process_count: int, even: bool) -> tuple[list[int], int]:
    """Indices of process_index's shard of n elements and the shard's (padded) length.

    even: every process gets floor(n / P) elements (training). Otherwise ceil(n / P), padded (evaluation).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if even:
        per_process = n // process_count
        return list(range(process_index, per_process * process_count, process_count)), per_process
    indices = list(range(process_index, n, process_count))
    return indices, -(-n // process_count)


def make_dataset(
    *,
    source: str = "geotiff",
    root: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    protocol: str = "exact",
    bands: None | str | Sequence[int | str] = None,
    batch_size: int = 8,
    crop_size: int | None = None,
    augment: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    drop_remainder: bool | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    on_error: str = "raise",
    cloud_prob_dir: str | os.PathLike | None = None,
    dataset: str = "sen12mscr",
    dates: int = 1,
    downsample: int = 1,
    to_float32: bool = False,
    cache: bool = False,
) -> grain.IterDataset:
    """The batched grain pipeline; `iter()` of it is a checkpointable PipelineIterator.

    Args:
      source: "geotiff" (raw layout under root) or "tfds" (ArrayRecord shards under data_dir).
      split, protocol, bands: which samples and S2 bands (see `crrf_jax.data.sen12mscr`).
      batch_size: per process.
      crop_size: random square crop (None: full patches). augment: random flips and 90-degree rotations.
      shuffle, seed: seeded global shuffle of this process's shard, reshuffled every epoch.
      num_epochs: None repeats forever.
      drop_remainder: default True when training (shuffle or repeating), False for an evaluation pass, which
        then pads the last batch (mask False) and shards so that every process makes as many batches.
      worker_count: grain worker processes (0: read in this process). read_threads: threads reading ahead
        in each reading process; None: `default_read_threads` (one for GeoTIFFs, the reading process's share
        of the cores for ArrayRecord shards). More than that only hide network storage's latency.
      process_index, process_count: this process's shard (default: jax.process_index() / process_count()).
      on_error: "raise" (a DataError naming the file) or "skip" (logged and counted, see the module docs).
      cloud_prob_dir: cloud-probability cache of the geotiff source (default root; train.py fills it first).
      dataset, dates, downsample: which benchmark (`sources.DATASETS`, see `sources.open_source`);
        `sources.dataset_options(config.data)` gives them from a config.
      to_float32: batches normalised on the host (`contract.normalize_batch(batch, numpy)` in the main
        process), for consumers without a jitted step; default: compact batches (module docstring).
      cache: hold every sample in memory after its first read (decoded, before cropping and augmentation),
        for datasets that fit: later epochs read no file. Each worker process holds its own copy of the
        samples it reads. Not for sources that draw at every read (SEN12MS-CR-TS training's date windows).
    """
    _check_options(on_error, batch_size, crop_size, worker_count, num_epochs)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if drop_remainder is None:
        drop_remainder = shuffle or num_epochs is None
    src = sources.open_source(source, root=root, data_dir=data_dir, split=split, protocol=protocol,
                              bands=bands, cloud_prob_dir=cloud_prob_dir, decode=False, dataset=dataset,
                              dates=dates, downsample=downsample, seed=seed)
    indices, length = shard_indices(len(src), process_index, process_count, even=drop_remainder)
    if not indices:
        raise ValueError(f"{src!r}: no element for process {process_index} of {process_count}")
    if drop_remainder and num_epochs is not None and length * num_epochs < batch_size:
        raise ValueError(
            f"{src!r}: {length} samples x {num_epochs} epochs cannot fill a batch of {batch_size}"
        )
    reader = _ShardReader(src, indices, length, on_error, cache)
    read_threads = default_read_threads(src, worker_count) if read_threads is None else read_threads
    if getattr(src, "needs_rng", False):  # draws per read (SEN12MS-CR-TS train): shuffle indices, then read
        ds, shuffle_here, epochs = _reads_of_shuffled_indices(reader, length, shuffle, seed, num_epochs), False, 1
    else:
        ds, shuffle_here, epochs = grain.MapDataset.source(reader), shuffle, num_epochs
    out = _batched(ds, batch_size, crop_size, augment, shuffle_here, seed, epochs, drop_remainder, worker_count,
                   worker_buffer_size, read_threads, to_float32)
    out.shuffled = shuffle
    return out


MAX_DEFAULT_READ_THREADS = 4


def host_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_read_threads(source, worker_count: int, cores: int | None = None) -> int:
    """Threads reading ahead in each reading process when `make_dataset` is not told.

    One, unless the source's reads release the GIL (`reads_release_gil`: the TFDS source): then the cores each
    reading process has to itself (all of `cores`, default this process's CPU affinity, without workers;
    cores // worker_count with them), at most MAX_DEFAULT_READ_THREADS, so that the reading leaves the
    training loop's own threads some room on a large host. rasterio holds the GIL through much of each GeoTIFF
    open (it builds the file's CRS under it), so a second thread there only adds CPU time (BENCHMARKS.md
    "Data pipeline").
    """
    if not getattr(source, "reads_release_gil", False):
        return 1
    if cores is None:
        cores = host_cores()
    return max(1, min(MAX_DEFAULT_READ_THREADS, cores // max(1, worker_count)))


def _reads_of_shuffled_indices(reader: _ShardReader, length: int, shuffle: bool, seed: int, num_epochs):
    """The element indices shuffled and repeated, then read with a generator seeded by the stream position
    (sources that draw per read)."""
    ds = grain.MapDataset.range(length)
    ds = EpochShuffle(ds, seed) if shuffle else ds
    ds = ds.repeat(num_epochs) if num_epochs != 1 else ds
    return ds.map_with_index(_ReadWithRng(reader, seed))


def _check_options(on_error: str, batch_size: int, crop_size: int | None, worker_count: int, num_epochs) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1 or (crop_size is not None and crop_size < 1) or worker_count < 0:
        raise ValueError(f"bad batch_size {batch_size}, crop_size {crop_size} or worker_count {worker_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")


def _batched(ds, batch_size, crop_size, augment, shuffle, seed, num_epochs, drop_remainder, worker_count,
             worker_buffer_size, read_threads, to_float32=False) -> grain.IterDataset:
    """Shuffle, repeat, augment, read, batch (padding or dropping the remainder), workers, bad-sample count."""
    if shuffle:
        ds = EpochShuffle(ds, seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if crop_size is not None or augment:
        ds = ds.random_map(RandomCropFlipRotate(crop_size, augment), seed=seed + 1)
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads) * 2)
    it_ds = ds.to_iter_dataset(read_options)
    # Batches stay in their compact stored dtypes, through the workers' shared memory too; the jitted step
    # normalises (contract.normalize_batch).
    # In grain workers each batch is written once, into a reused shared-memory slot (`shm_slots`): as many as
    # can be in flight, the worker's queue and the main process's buffer of it, plus the consumer's and the
    # one being written.
    it_ds = _BatchSkippingBad(it_ds, batch_size, drop_remainder, pad=not drop_remainder,
                              max_slots=2 * worker_buffer_size + 4)
    if worker_count > 0:
        it_ds.enable_shared_memory_output()  # grain itself enables it only with several workers
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size),
            worker_init_fn=_init_worker,
        )
    else:
        host_memory.keep_large_buffers()  # this process reads: reuse its patch buffers (host_memory)
    return _CountBadSamples(it_ds, to_float32)


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Runs first in every grain worker process: the reading process's allocator settings."""
    del worker_index, worker_count
    host_memory.keep_large_buffers()


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app nobody parsed them: take the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_dataset(**kwargs: Any) -> grain.IterDataset:
    """make_dataset for one deterministic evaluation pass: no shuffle, no augmentation, full patches, padded
    last batch (mask False), equal batch counts on every process."""
    return make_dataset(
        **{
            **kwargs,
            "shuffle": False,
            "augment": False,
            "crop_size": None,
            "num_epochs": 1,
            "drop_remainder": False,
        }
    )


# ------------------------------------------------------------------------------------------------ checkpoints


def save_iterator_state(iterator: grain.DatasetIterator, directory: str | os.PathLike) -> Path:
    """Writes the iterator state as process_<i>-of-<n>.json under directory (the layout grain's Orbax
    handler uses, so either can restore it); returns the file. For Orbax managers pass
    `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` instead."""
    import jax

    path = Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(iterator.get_state(), indent=2))
    os.replace(tmp, path)
    return path


def restore_iterator_state(
    iterator: grain.DatasetIterator, directory: str | os.PathLike
) -> grain.DatasetIterator:
    """Sets iterator to the state save_iterator_state wrote under directory; returns it."""
    import jax

    path = Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no data-iterator state for this process")
    iterator.set_state(json.loads(path.read_text()))
    return iterator
