"""Grain input pipelines over SEN12MS-CR and the other benchmarks: shuffle, augment, batch, shard per JAX
process, checkpointable.

Two sources give the same samples (the data contract of `crrf_jax.data.contract`, docs/ARCHITECTURE.md "Data
contract"; channels last):

- `GeoTiffSource`: the raw layout, read with `read_triplet` plus the cached cloud probability;
- `TfdsSource`: the ArrayRecord shards of `crrf_jax.data.tfds` through `tfds.data_source` (no TensorFlow).

`make_dataset(...)` chains them into a grain pipeline and `iter(...)` of it is a `PipelineIterator`::

    source -> this process's shard -> shuffle(seed) -> repeat(num_epochs) -> read (skip or raise)
      -> random crop / flips / 90-degree rotations (same for every modality) -> batch -> worker processes

Where normalisation happens. Batches stay compact on the host: both sources read S2 as stored uint16 DN and
the cloud probability as stored uint8 x 255, and so do the augmentation, the batch, grain's worker processes
and their shared memory (half the bytes of float32 for S2, a quarter for the cloud map). The float32 contract
is made by `contract.normalize_batch` as the first operation inside the jitted steps (train_lib.train_step,
sampling.sample_patches, the latent encoders), bit-identical to the host conversions it replaces; host
consumers that need floats (evaluation, previews) call it with xp=numpy, or pass `to_float32=True`. So are
the flips and rotations of augmented batches: the host crops, draws each sample's transform and batches the
crops as read; `contract.normalize_batch` applies the transform (`contract.FLIP_ROTATE`), bit for bit what
rotating on the host gave.

Reading processes (this one without workers, every grain worker) keep their patch-sized buffers for reuse
instead of mapping them afresh at every read (`host_memory.keep_large_buffers`).

Batches are dicts: s1 (B, H, W, 2) float32 [0, 1]; s2 and s2_cloudy (B, H, W, C) uint16 DN; cloud_prob
(B, H, W, 1) uint8; id (B,) str; mask (B,) bool, False on padding (evaluation only); with augment,
flip_rotate (B, 2) int8, the transforms still to apply. A float DN GeoTIFF gives
float32 [0, 1] S2 (so does a batch mixing it with uint16 files); `to_float32=True` gives float32 throughout.

The other benchmarks (`dataset`: `DATASETS`, one source each: `CuhkCrSource`, `Sen2MtcSource`,
`Sen12mscrTsSource`) give the same keys, without s1 where the dataset has no SAR, and with a date axis on
s2_cloudy, cloud_prob and s1 where it is multi-temporal: (B, T, H, W, C) (docs/ARCHITECTURE.md, "Data
contract"). A source that draws per read (`needs_rng`: SEN12MS-CR-TS's random date sampler) is read after the
shuffle, with a generator seeded by the element's stream position.

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

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from grain.python import SharedMemoryArray

from crrf_jax.data import (
    cloudprob,
    contract,
    cuhk_cr,
    host_memory,
    sen2_mtc,
    sen12mscr,
    sen12mscr_ts,
    shm_slots,
    tf_example,
)
from crrf_jax.data.contract import ARRAY_KEYS, DataError, array_keys
from crrf_jax.data.epoch_shuffle import EpochShuffle
from crrf_jax.data.sen12mscr import BadSampleLog, Triplet

logger = logging.getLogger(__name__)

_BAD = "_bad"  # key of a bad-sample marker: (id, path, reason)
_SKIPPED = "_skipped"  # batch key carrying the markers met while assembling it
SHUFFLE_ORDER = "epoch_shuffle/1"  # the iterator state's name for the order `EpochShuffle` draws


# ---------------------------------------------------------------------------------------------------- sources


class GeoTiffSource:
    """Random access to SEN12MS-CR triplets in the raw layout (grain RandomAccessDataSource protocol).

    `source[i]` reads triplet i of `find_triplets(root, split, protocol)` and its cached cloud probability
    (under `cloud_prob_dir`, default root) -> dict of s1, s2, s2_cloudy, cloud_prob float32 arrays and id.
    With compact=True (the pipeline's form) s2 / s2_cloudy stay uint16 DN and cloud_prob uint8 as stored
    (read straight into channels-last arrays, nothing converted). Raises DataError naming the file on a bad or
    missing file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        protocol: str = "exact",
        bands: None | str | Sequence[int | str] = None,
        cloud_prob_dir: str | os.PathLike | None = None,
        compact: bool = False,
    ):
        self.root, self.compact = Path(root), compact
        self.split, self.protocol = split, protocol
        self.bands = contract.resolve_bands(bands)
        self.cloud_prob_dir = Path(cloud_prob_dir) if cloud_prob_dir is not None else self.root
        self.triplets: list[Triplet] = sen12mscr.find_triplets(self.root, split, protocol)

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        triplet = self.triplets[index]
        sample = sen12mscr.read_triplet(triplet, self.bands, compact=self.compact)
        try:
            cloud_prob = cloudprob.load_cloud_prob(self.cloud_prob_dir, triplet, compact=self.compact)
        except FileNotFoundError as err:
            raise DataError(cloudprob.cloud_prob_path(self.cloud_prob_dir, triplet), str(err)) from err
        return {
            "s1": sample["s1"],
            "s2": sample["s2"],
            "s2_cloudy": sample["s2_cloudy"],
            "cloud_prob": cloud_prob,
            "id": sample["id"],
        }

    def __repr__(self) -> str:
        return f"GeoTiffSource({self.root}, split={self.split}, protocol={self.protocol}, n={len(self)})"


class TfdsSource:
    """Random access to the `sen12mscr/<protocol>` ArrayRecord shards under data_dir (no TensorFlow).

    `source[i]` -> the same dict as GeoTiffSource (decoded by `crrf_jax.data.tfds.decode_example`). With
    decode=False the arrays keep their stored dtypes (s2 uint16 DN, cloud_prob uint8 x255, s1 float32), the
    pipeline's compact form (`contract.normalize_batch` converts). The TFDS reader is opened lazily in each
    process, so the source pickles cheaply into grain workers.
    """

    # riegeli's reader lets go of the GIL while it reads and checks a record, and the compact parse after it
    # is brief, so reading threads in one process read on as many cores (`default_read_threads`).
    reads_release_gil = True

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        protocol: str = "exact",
        bands: None | str | Sequence[int | str] = None,
        decode: bool = True,
    ):
        self.data_dir, self.split, self.protocol = str(data_dir), split, protocol
        self.bands = contract.resolve_bands(bands)
        self.decode = decode
        self._reader = None
        self._length = len(self._open())

    def _open(self):
        # One thread imports TFDS and opens the reader while grain's reading threads wait: importing lazily
        # from several threads at once deadlocks on TFDS's lazy-import locks.
        with _TFDS_LOCK:
            if self._reader is None:
                tfds, builder = _tfds_modules()
                name = builder.dataset_name(self.protocol)
                try:
                    self._reader = tfds.data_source(
                        name, data_dir=self.data_dir, split=self.split, download=False
                    )
                except Exception as err:  # TFDS raises several types: name the folder in one error
                    raise FileNotFoundError(
                        f"{self.data_dir}: cannot open TFDS {name} split {self.split!r} ({err}); build it "
                        f"with `python -m crrf_jax.data.tfds --manual_dir RAW --data_dir {self.data_dir} "
                        f"--protocol {self.protocol}`"
                    ) from err
            return self._reader

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        reader = self._open()
        if self.decode:
            return _tfds_modules()[1].decode_example(reader[index], self.bands)
        sample = self._parse(reader.data_source[index], index)  # the record's bytes, without TFDS's decoding
        if len(self.bands) != len(contract.S2_BANDS):
            sample["s2"], sample["s2_cloudy"] = (sample[k][..., list(self.bands)]
                                                 for k in ("s2", "s2_cloudy"))
        return sample

    def _parse(self, record: bytes, index: int) -> dict[str, Any]:
        """A stored record -> its arrays in their stored dtypes, read-only views of the record's own bytes
        (TFDS's decoding, and protobuf's parser under it, copy every array: BENCHMARKS.md "Data pipeline").
        The layout is TFDS's serialisation of our features: "<key>/value" raw bytes and "<key>/shape" for
        each array, "id" text."""
        stored = _tfds_modules()[1].FEATURES  # {key: (dtype, channels)}
        try:
            features = tf_example.parse_example(record)
            sample = {key: np.frombuffer(features[f"{key}/value"].of("bytes_list")[0], stored[key][0])
                      .reshape(tuple(features[f"{key}/shape"].of("int64_list"))) for key in ARRAY_KEYS}
            sample["id"] = bytes(features["id"].of("bytes_list")[0]).decode()
        except (KeyError, IndexError, ValueError) as err:  # ExampleError is a ValueError
            reason = f"record {index} of split {self.split!r} is not a sen12mscr example"
            raise DataError(self.data_dir, f"{reason} ({type(err).__name__}: {err}); rebuild the shards") from err
        return sample

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()  # in a grain worker: while unpickling, before its reading threads start

    def __repr__(self) -> str:
        return f"TfdsSource({self.data_dir}, split={self.split}, protocol={self.protocol}, n={len(self)})"


_TFDS_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------ the other benchmarks

# `config.data.dataset` values. The band set comes from the dataset: the RGBN ones hold Sentinel-2 B04, B03,
# B02, B08 (CUHK-CR's R, G, B, NIR are named so too), SEN12MS-CR and SEN12MS-CR-TS all 13 bands.
DATASETS = ("sen12mscr", "cuhk_cr1", "cuhk_cr2", "sen2_mtc_new", "sen12mscr_ts")
RGBN_BANDS = ("B04", "B03", "B02", "B08")
# Reflectance of an 8-bit CUHK-CR value of 1 for `cloudprob.rgbn_cloud_score`. The archive's 8-bit stretch
# is not documented; 0.5 is that of our synthetic copies (8 bits = DN / 5000) and puts clouds, which saturate
# the 8-bit images, at reflectance 0.5, above the score's brightness floor.
CUHK_REFLECTANCE_SCALE = 0.5
_CUHK_VARIANT = {"cuhk_cr1": "CR1", "cuhk_cr2": "CR2"}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset gives: its bands (S2 names), SAR or not, dates per sample (1: single image; None: set
    by config.data.dates), whether its files are georeferenced (eval's GeoTIFF predictions), and the cloud
    probability its samples carry (`cloud_score`: "s2cloudless", or "rgbn" = `cloudprob.rgbn_cloud_score`
    with `reflectance_scale`), which a model trained on it needs at prediction too."""

    bands: tuple[str, ...]
    has_sar: bool
    dates: int | None
    georeferenced: bool
    cloud_score: str = "s2cloudless"
    reflectance_scale: float = 1.0

    def cloud_score_config(self) -> dict[str, Any]:
        """The bundle's record of it (crrf_jax.bundle config "cloud_score")."""
        if self.cloud_score == "s2cloudless":
            return {"kind": "s2cloudless"}
        return {"kind": self.cloud_score, "reflectance_scale": self.reflectance_scale}


DATASET_INFO = {
    "sen12mscr": DatasetInfo(contract.S2_BANDS, True, 1, True),
    "cuhk_cr1": DatasetInfo(RGBN_BANDS, False, 1, False, "rgbn", CUHK_REFLECTANCE_SCALE),
    "cuhk_cr2": DatasetInfo(RGBN_BANDS, False, 1, False, "rgbn", CUHK_REFLECTANCE_SCALE),
    "sen2_mtc_new": DatasetInfo(RGBN_BANDS, False, sen2_mtc.N_DATES, True, "rgbn"),
    "sen12mscr_ts": DatasetInfo(contract.S2_BANDS, True, None, True),
}


def dataset_info(dataset: str) -> DatasetInfo:
    if dataset not in DATASET_INFO:
        raise ValueError(f"config.data.dataset={dataset!r}: choose one of {DATASETS}")
    return DATASET_INFO[dataset]


def dataset_options(data_config) -> dict[str, Any]:
    """The `make_dataset` / `open_source` keywords of a config's `data` section that pick the dataset:
    dataset, dates, downsample (absent keys: SEN12MS-CR, 1 date, full size)."""
    return {"dataset": data_config.get("dataset", "sen12mscr"), "dates": int(data_config.get("dates", 1)),
            "downsample": int(data_config.get("downsample", 1))}


def _rgbn_selection(dataset: str, bands) -> list[int]:
    """Channels of a band selection (a `contract.resolve_bands` spec, Sentinel-2 names or indices) in a
    dataset whose files hold `RGBN_BANDS`; ValueError naming the bands it lacks."""
    if bands is None:
        return list(range(len(RGBN_BANDS)))
    names = [contract.S2_BANDS[i] for i in contract.resolve_bands(bands)]
    lacking = [n for n in names if n not in RGBN_BANDS]
    if lacking:
        raise ValueError(f"dataset {dataset} holds bands {','.join(RGBN_BANDS)} only, not {','.join(lacking)}; "
                         f"set config.data.bands to them (or a subset)")
    return [RGBN_BANDS.index(n) for n in names]


def downsample_bicubic(image: np.ndarray, factor: int) -> np.ndarray:
    """(..., H, W, C) float image shrunk by an integer factor with antialiased bicubic (PIL: the kernel of
    MATLAB's imresize, a = -0.5, widened by the factor; borders renormalised where MATLAB mirrors), clipped
    to [0, 1]. EMRDM halves CUHK-CR this way (MATLAB-style imresize(x, 1/2)) before training and testing."""
    from PIL import Image

    image = np.asarray(image, np.float32)
    if factor == 1:
        return image
    height, width = image.shape[-3:-1]
    size = (width // factor, height // factor)
    flat = image.reshape(-1, height, width, image.shape[-1])
    out = np.stack([
        np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im[..., c]), mode="F")
                             .resize(size, Image.Resampling.BICUBIC)) for c in range(im.shape[-1])], -1)
        for im in flat
    ])
    return np.clip(out, 0.0, 1.0).reshape(*image.shape[:-3], size[1], size[0], image.shape[-1])


class CuhkCrSource:
    """CUHK-CR1 / CUHK-CR2 (`crrf_jax.data.cuhk_cr`) as a grain source: s2, s2_cloudy (H, W, C), cloud_prob
    (H, W, 1) from `cloudprob.rgbn_cloud_score`, id; no s1 (no SAR). `downsample=2` halves the images
    (`downsample_bicubic`) as EMRDM does (512 -> 256); the cloud score is computed on the shrunk image.
    Splits: "train", "test" (the archive has no validation folder)."""

    has_sar = False

    def __init__(self, root, dataset: str = "cuhk_cr1", split: str = "train", bands=None, downsample: int = 1,
                 nir_root=None):
        if dataset not in _CUHK_VARIANT:
            raise ValueError(f"CuhkCrSource: dataset must be one of {tuple(_CUHK_VARIANT)}, got {dataset!r}")
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.root, self.dataset, self.split, self.downsample = Path(root), dataset, split, int(downsample)
        self.channels = _rgbn_selection(dataset, bands)
        self.items = cuhk_cr.find_pairs(self.root, _CUHK_VARIANT[dataset], split, nir_root=nir_root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = cuhk_cr.read_pair(self.items[index])  # all 4 bands: the cloud score needs them
        clear, cloudy = (downsample_bicubic(sample[k], self.downsample) for k in ("s2", "s2_cloudy"))
        return {"s2": clear[..., self.channels], "s2_cloudy": cloudy[..., self.channels],
                "cloud_prob": cloudprob.rgbn_cloud_score(cloudy, CUHK_REFLECTANCE_SCALE), "id": sample["id"]}

    def reference_file(self, index: int) -> Path | None:
        return None  # PNGs: nothing to georeference a prediction with

    def __repr__(self) -> str:
        return f"CuhkCrSource({self.root}, {self.dataset}, split={self.split}, n={len(self)})"


class Sen2MtcSource:
    """Sen2_MTC_New (`crrf_jax.data.sen2_mtc`) as a grain source: s2 (H, W, C) the clear target, s2_cloudy
    (3, H, W, C) the cloudy dates _0, _1, _2, cloud_prob (3, H, W, 1) `cloudprob.rgbn_cloud_score` of each
    date, id; no s1 (no SAR). With `dates` = k < 3, the k least cloudy dates (lowest mean cloud score; ties to
    the earlier) in date order; k = 1 gives a single-date sample (s2_cloudy (H, W, C), cloud_prob (H, W, 1)):
    the single-image baseline of a temporal benchmark."""

    has_sar = False

    def __init__(self, root, split: str = "train", bands=None, dates: int = sen2_mtc.N_DATES):
        if not 1 <= dates <= sen2_mtc.N_DATES:
            raise ValueError(f"Sen2_MTC_New has {sen2_mtc.N_DATES} cloudy dates per sample; "
                             f"config.data.dates={dates} must be 1 to {sen2_mtc.N_DATES}")
        self.dates = dates
        self.root, self.split = Path(root), split
        self.channels = _rgbn_selection("sen2_mtc_new", bands)
        self.items = sen2_mtc.find_samples(self.root, split)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = sen2_mtc.read_sample(self.items[index])
        cloudy, prob = sample["s2_cloudy"], cloudprob.rgbn_cloud_score(sample["s2_cloudy"])
        if self.dates < len(cloudy):
            keep = contract.least_cloudy_dates(prob, self.dates)
            cloudy, prob = cloudy[keep], prob[keep]
            cloudy, prob = (cloudy[0], prob[0]) if self.dates == 1 else (cloudy, prob)
        return {"s2": sample["s2"][..., self.channels], "s2_cloudy": cloudy[..., self.channels],
                "cloud_prob": prob, "id": sample["id"]}

    def reference_file(self, index: int) -> Path | None:
        return self.items[index].s2

    def __repr__(self) -> str:
        return f"Sen2MtcSource({self.root}, split={self.split}, n={len(self)})"


class Sen12mscrTsSource:
    """SEN12MS-CR-TS (`crrf_jax.data.sen12mscr_ts`) as a grain source: `dates` input dates and a target chosen
    as UnCRtainTS does, s1 (T, H, W, 2) and s2_cloudy (T, H, W, C) of the inputs in date order, cloud_prob
    (T, H, W, 1) s2cloudless of each input date (on all 13 bands), s2 (H, W, C) the target.

    sampler: "random" (`select_dates_random`, UnCRtainTS's train default: a fresh draw per epoch through the
    pipeline's generator, `needs_rng`) or "fixed" (`select_dates_fixed`, its val/test choice: the first
    `dates` dates, the target the earliest least cloudy one, which may be among them); default random for
    train, fixed otherwise. Both read each date's cloud coverage, and cloud_prob its probability map, from
    `cloudprob.compute_ts_coverage`'s cache under cloud_prob_dir (default root; train.py fills it first);
    what the cache lacks is computed on read (seconds a date on a CPU: fill the cache for training). A
    series with too few dates is a DataError naming its first file.
    """

    has_sar = True

    def __init__(self, root, split: str = "train", bands=None, dates: int = 3, sampler: str | None = None,
                 cloud_prob_dir=None, seed: int = 0):
        sampler = sampler or ("random" if split == "train" else "fixed")
        if sampler not in ("random", "fixed"):
            raise ValueError(f"sampler must be 'random' or 'fixed', got {sampler!r}")
        if dates < 1:
            raise ValueError(f"config.data.dates={dates} must be >= 1")
        self.root, self.split, self.dates, self.sampler, self.seed = Path(root), split, int(dates), sampler, seed
        self.channels = list(contract.resolve_bands(bands))
        self.needs_rng = sampler == "random"
        self.items = sen12mscr_ts.find_series(self.root, split)
        self.cache_dir = self.root if cloud_prob_dir is None else Path(cloud_prob_dir)
        self._coverage = cloudprob.load_ts_coverage(self.cache_dir)

    def __len__(self) -> int:
        return len(self.items)

    def coverage(self, index: int) -> list[float]:
        series = self.items[index]
        if len(self._coverage.get(series.id, ())) != len(series):
            self._coverage[series.id] = sen12mscr_ts.cloud_coverage(series)
        return self._coverage[series.id]

    def _choice(self, index: int, rng) -> sen12mscr_ts.DateChoice:
        series, coverage = self.items[index], self.coverage(index)
        try:
            if self.sampler == "fixed":
                return sen12mscr_ts.select_dates_fixed(coverage, self.dates)
            return sen12mscr_ts.select_dates_random(coverage, self.dates, rng)
        except ValueError as err:
            raise DataError(series.s2[0], f"series {series.id} has {len(series)} dates, too few for "
                                          f"{self.dates} inputs and a target ({err})") from err

    def read(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        if rng is None and self.needs_rng:
            rng = np.random.default_rng([self.seed, 17, int(index)])
        choice = self._choice(index, rng)
        series = self.items[index]
        sample = sen12mscr_ts.read_series(series, choice.inputs, choice.target)  # all 13 bands
        cached = [cloudprob.load_ts_cloud_prob(self.cache_dir, series.s2[t]) for t in choice.inputs]
        if any(p is None or p.shape[:2] != sample["s2"].shape[:2] for p in cached):
            cloud_prob = cloudprob.cloud_probability(sample["s2_cloudy"])
        else:
            cloud_prob = np.stack(cached)
        return {"s1": sample["s1"], "s2": sample["s2"][..., self.channels],
                "s2_cloudy": sample["s2_cloudy"][..., self.channels], "cloud_prob": cloud_prob, "id": sample["id"]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.read(index)

    def reference_file(self, index: int) -> Path | None:
        """The target's S2 file (the fixed sampler's; a random draw's target varies)."""
        series = self.items[index]
        return series.s2[sen12mscr_ts.select_dates_fixed(self.coverage(index), self.dates).target]

    def __repr__(self) -> str:
        return f"Sen12mscrTsSource({self.root}, split={self.split}, sampler={self.sampler}, n={len(self)})"


def _tfds_modules():
    """(tensorflow_datasets, crrf_jax.data.tfds.sen12mscr_dataset_builder), imported on first use (~1 s)."""
    import tensorflow_datasets

    from crrf_jax.data.tfds import sen12mscr_dataset_builder

    return tensorflow_datasets, sen12mscr_dataset_builder


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


def open_source(
    source: str,
    *,
    root: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    protocol: str = "exact",
    bands: None | str | Sequence[int | str] = None,
    cloud_prob_dir: str | os.PathLike | None = None,
    decode: bool = True,
    dataset: str = "sen12mscr",
    dates: int = 1,
    downsample: int = 1,
    seed: int = 0,
):
    """The source of a dataset (`DATASETS`). SEN12MS-CR: a GeoTiffSource ("geotiff", needs root) or
    TfdsSource ("tfds", needs data_dir; `decode` see there). The other datasets read their official layout
    under root (source "geotiff": the raw files): CuhkCrSource (`downsample`), Sen2MtcSource and
    Sen12mscrTsSource (`dates` inputs; `cloud_prob_dir` holds its coverage cache, `seed` its default draws).
    decode=False: compact samples (stored dtypes, see the sources).
    """
    if dataset != "sen12mscr":
        dataset_info(dataset)
        if source != "geotiff":
            raise ValueError(f"dataset {dataset!r} reads its raw layout (source='geotiff'), got source={source!r}")
        if root is None:
            raise ValueError(f"dataset {dataset!r} needs root (the folder of its official layout)")
        if dataset in _CUHK_VARIANT:
            return CuhkCrSource(root, dataset, split, bands, downsample)
        if dataset == "sen2_mtc_new":
            return Sen2MtcSource(root, split, bands, dates)
        return Sen12mscrTsSource(root, split, bands, dates, cloud_prob_dir=cloud_prob_dir, seed=seed)
    if dates != 1 or downsample != 1:
        raise ValueError(f"SEN12MS-CR is single-date at full size: dates={dates}, downsample={downsample}")
    if source == "geotiff":
        if root is None:
            raise ValueError("source='geotiff' needs root (the SEN12MS-CR folder)")
        return GeoTiffSource(root, split, protocol, bands, cloud_prob_dir, compact=not decode)
    if source == "tfds":
        if data_dir is None:
            raise ValueError(
                "source='tfds' needs data_dir (where `python -m crrf_jax.data.tfds` wrote shards)"
            )
        return TfdsSource(data_dir, split, protocol, bands, decode=decode)
    raise ValueError(f"source must be 'geotiff' or 'tfds', got {source!r}")


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
      dataset, dates, downsample: which benchmark (`DATASETS`, see `open_source`); `dataset_options(config.data)`
        gives them from a config.
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
    src = open_source(source, root=root, data_dir=data_dir, split=split, protocol=protocol, bands=bands,
                      cloud_prob_dir=cloud_prob_dir, decode=False, dataset=dataset, dates=dates,
                      downsample=downsample, seed=seed)
    indices, length = shard_indices(len(src), process_index, process_count, even=drop_remainder)
    if not indices:
        raise ValueError(f"{src!r}: no element for process {process_index} of {process_count}")
    if drop_remainder and num_epochs is not None and length * num_epochs < batch_size:
        raise ValueError(
            f"{src!r}: {length} samples x {num_epochs} epochs cannot fill a batch of {batch_size}"
        )
    reader = _ShardReader(src, indices, length, on_error, cache)
    if read_threads is None:
        read_threads = default_read_threads(src, worker_count)
    if getattr(src, "needs_rng", False):  # draws per read (SEN12MS-CR-TS train): shuffle indices, then read
        ds, shuffle_here, epochs = _reads_of_shuffled_indices(reader, length, shuffle, seed, num_epochs), False, 1
    else:
        ds, shuffle_here, epochs = grain.MapDataset.source(reader), shuffle, num_epochs
    out = _batched(ds, batch_size, crop_size, augment, shuffle_here, seed, epochs, drop_remainder, worker_count,
                   worker_buffer_size, read_threads, to_float32)
    out.shuffled = shuffle
    return out


MAX_DEFAULT_READ_THREADS = 4


def default_read_threads(source, worker_count: int, cores: int | None = None) -> int:
    """Threads reading ahead in each reading process when `make_dataset` is not told.

    One, unless the source's reads release the GIL (`reads_release_gil`: the TFDS source): then the cores each
    reading process has to itself (all of `cores`, default this process's CPU affinity, without workers;
    cores // worker_count with them), at most MAX_DEFAULT_READ_THREADS, so that the reading leaves the
    training loop's own threads some room on a large host. GeoTIFF reads hold the GIL between GDAL's calls
    (rasterio), so a second thread there only adds CPU time (BENCHMARKS.md "Data pipeline").
    """
    if not getattr(source, "reads_release_gil", False):
        return 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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
