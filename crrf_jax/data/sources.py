"""The datasets' grain sources (random access: `len(source)`, `source[i]` -> one sample) and what each
dataset gives (`DatasetInfo`).

SEN12MS-CR has two sources that give the same samples (the data contract of `crrf_jax.data.contract`,
docs/ARCHITECTURE.md "Data contract"; channels last):

- `GeoTiffSource`: the raw layout, read with `read_triplet` plus the cached cloud probability;
- `TfdsSource`: the ArrayRecord shards of `crrf_jax.data.tfds` through `tfds.data_source` (no TensorFlow).

The other benchmarks (`DATASETS`, one source each: `CuhkCrSource`, `Sen2MtcSource`, `Sen12mscrTsSource`)
give the same keys, without s1 where the dataset has no SAR, and with a date axis on s2_cloudy, cloud_prob
and s1 where it is multi-temporal: (T, H, W, C). A source that draws per read (`needs_rng`: SEN12MS-CR-TS's
random date sampler) also has `read(index, rng)`; one whose reads let go of the GIL says so
(`reads_release_gil`: the pipeline then reads it in several threads). `open_source` picks the source of a
config's dataset; `crrf_jax.data.pipeline` shuffles, augments and batches any of them. Every source raises
`DataError` naming the file of a bad sample.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crrf_jax.data import cloudprob, contract, cuhk_cr, sen2_mtc, sen12mscr, sen12mscr_ts, tf_example
from crrf_jax.data.contract import ARRAY_KEYS, DataError
from crrf_jax.data.sen12mscr import Triplet

# ------------------------------------------------------------------------------------------------- SEN12MS-CR


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


def _tfds_modules():
    """(tensorflow_datasets, crrf_jax.data.tfds.sen12mscr_dataset_builder), imported on first use (~1 s)."""
    import tensorflow_datasets

    from crrf_jax.data.tfds import sen12mscr_dataset_builder

    return tensorflow_datasets, sen12mscr_dataset_builder


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


# ------------------------------------------------------------------------------------------ choosing a source


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
