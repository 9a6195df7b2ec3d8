"""SEN12MS-CR-TS on disk: time series of Sentinel-1 and Sentinel-2 patches, the official split, the
published choice of input dates and target, validated reading.

SEN12MS-CR-TS (Ebel et al., TGRS 2022) is the multi-temporal benchmark of UnCRtainTS (CVPRW 2023) and one of
EMRDM's (CVPR 2025): 53 regions of interest (ROIs) around the world, each cut into patches, each patch seen on
up to 30 dates of 2018 by both Sentinel-1 (2 bands, dB) and Sentinel-2 L1C (13 bands, uint16 DN).

Sources (read, not copied; the code here is our own):

- layout, file names, ROI list and split: PatrickTUM/UnCRtainTS ``data/dataLoader.py`` (class ``SEN12MSCRTS``:
  ``self.ROI``, ``self.splits`` for ``region='all'``, ``get_paths``, ``get_imgs``) and the dataset's own
  repository PatrickTUM/SEN12MS-CR-TS (``README.md``, ``util/dl_data.sh``: train archives hold the train ROIs,
  a separate "test" download holds the validation and test ROIs; merged, they give this layout);
- scaling: the same file's ``process_MS`` / ``process_SAR`` (``rescale_method='default'``), which are the data
  contract's ``normalize_s2`` and ``normalize_s1_filled``;
- choice of dates: the same file's ``fixed_sampler`` and ``random_sampler`` and ``get_cloud_map``
  (``cloud_masks='s2cloudless_mask'``, the default), and PatrickTUM/UnCRtainTS ``model/train_reconstruct.py``
  and ``model/parse_args.py`` for which sampler each split uses.

Layout (``<region>`` is one of ``REGIONS``, ``<n>`` the ROI number, ``<t>`` the date index 0..29, ``<k>`` the
patch number, ``<date>`` the acquisition date YYYY-MM-DD, which differs between S1 and S2)::

    <root>/<region>/<n>/S1/<t>/s1_<region>_<n>_ImgNo_<t>_<date>_patch_<k>.tif     S1, float32 dB, 2 bands
    <root>/<region>/<n>/S2/<t>/s2_<region>_<n>_ImgNo_<t>_<date>_patch_<k>.tif     S2, uint16 DN, 13 bands

e.g. ``ROIs1868/17/S2/4/s2_ROIs1868_17_ImgNo_4_2018-02-19_patch_42.tif``. A sample (``Series``) is one patch
of one ROI with all its dates; its id is ``<region>_<n>_p<k>``, e.g. ``ROIs1868_17_p42``.

Splits. ``ROIS`` are the 53 ROIs of UnCRtainTS's loader; ``TEST_ROIS`` (13, "official test split, across
continents") and ``VAL_ROIS`` (5) are its lists, and train is every other ROI of ``ROIS`` (35). A patch
belongs to a split when its region and ROI number equal an entry (exact match; the three splits are
disjoint). ROI folders that are not among the 53 are ignored, as in UnCRtainTS. UnCRtainTS's smaller
per-continent splits (``region='africa'`` etc.) are not reproduced here. The number of patches per split is
not in the public code (UnCRtainTS only prints it at run time), so only the ROI counts (``N_ROIS``) are
constants.

Known leaks and ambiguities:

- Across the two datasets: ROI numbers are shared with SEN12MS-CR (UnCRtainTS says so in its SEN12MS-CR train
  list, whose entry ``ROIs1868_summer_s1/s1_100`` "is also used for testing in SEN12MS-CR-TS"). So
  pretraining on SEN12MS-CR and testing here leaks: summer 100 is in SEN12MS-CR's (legacy) train list, the
  SEN12MS-CR-TS test ROIs winter 32, 103, 140, fall 20, 132 and summer 100, 142 are "train" under
  ``sen12mscr``'s exact protocol (which calls every unlisted ROI train), so is the validation ROI winter 117,
  and the SEN12MS-CR-TS train ROI winter 130 is a SEN12MS-CR validation ROI. ``sen12mscr_overlap()``
  lists them from both modules' tables.
- The fixed sampler (``select_dates_fixed``) takes the *first* T dates whose cloud coverage lies in
  [min_cov, max_cov], without excluding the target; with UnCRtainTS's defaults (0, 1) the inputs are always
  dates 0..T-1 and the target can be one of them. We reproduce that (``exclude_target=False``) and offer
  ``exclude_target=True``. UnCRtainTS picks the target with ``np.argsort(coverage)[0]``, which is not stable
  for ties on 30 values although its comment says "(earliest) least cloudy"; we take the earliest.
- Published test numbers use date choices precomputed by the authors (``generic_3_test_all_s2cloudless_mask.
  npy``, a pickled dict linked from the README, which we do not load: no pickle). Pass its indices to
  ``read_series`` (``inputs``, ``target``) or its coverages to ``select_dates_fixed`` after converting it
  offline.
- Training in UnCRtainTS: ``--vary_samples`` is a ``store_false`` flag, so by default train uses the random
  sampler (``select_dates_random``) and validation/test the fixed one.
- S1 and S2 partners are paired by date index and patch number (UnCRtainTS pairs the k-th file of each date
  folder after natural sorting, which is the same when no file is missing; we check instead of assuming).
- Grids: every file of a sample must lie on the target S2 file's grid (``contract.check_same_grid``). This
  was checked on generated data only; no real SEN12MS-CR-TS file was at hand.

Cloud coverage of a date (``cloud_coverage``): as UnCRtainTS's default, the fraction of pixels of the
s2cloudless *mask* (``S2PixelCloudDetector(threshold=0.4, all_bands=True, average_over=4, dilation_size=2)``,
on DN clipped to [0, 10000] / 10000); an all-zero image counts as fully cloudy (coverage 1).

Validation. Every problem with a file raises ``DataError`` whose message starts with that file's path (for a
missing file: the expected path, with ``*`` for the unknown date): a missing S1 partner of an S2 date (or S2
of an S1 date), a missing date of a patch, date folders with gaps, unparseable or out-of-order dates (each
modality's dates must increase strictly with the date index), unreadable files, wrong band counts (S1 2,
S2 13) or dtypes, sizes or grids that differ from the target's, NaN/Inf in S2, and S1 with more non-finite
values than allowed (fewer are filled with -25 dB, as ``sen12mscr``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import logging
import os
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.crs
import rasterio.transform

from crrf_jax.data import sen12mscr, synthetic
from crrf_jax.data.contract import (
    GDAL_ENV,
    S1_BANDS,
    S1_DTYPES,
    S2_BANDS,
    S2_DN_MAX,
    S2_DTYPES,
    DataError,
    open_geotiff,
    resolve_bands,
)

logger = logging.getLogger(__name__)

REGIONS = ("ROIs1158", "ROIs1868", "ROIs1970", "ROIs2017")
SPLITS = ("train", "val", "test", "all")
N_DATES = 30  # dates per patch in the published data (UnCRtainTS: time_points = range(30))
S1_LAUNCH = datetime.date(2014, 4, 3)  # UnCRtainTS's reference date for "days" (S1_LAUNCH, --ref_date)
CLEAR_THRESHOLD = 1e-3  # UnCRtainTS's clear_tresh: a target above this coverage is not a coverage match
S1_MAX_NONFINITE_FRACTION = sen12mscr.S1_MAX_NONFINITE_FRACTION


def _table(**numbers: str) -> dict[str, frozenset[int]]:
    return {region: frozenset(int(n) for n in text.split()) for region, text in numbers.items()}


# PatrickTUM/UnCRtainTS data/dataLoader.py, SEN12MSCRTS.__init__ (self.ROI; self.splits for region='all').
ROIS = _table(
    ROIs1158="106",
    ROIs1868="17 36 56 73 85 100 114 119 121 126 127 139 142 143",
    ROIs1970="20 21 35 40 57 65 71 82 83 91 112 116 119 128 132 133 135 139 142 144 149",
    ROIs2017="8 22 25 32 49 61 63 69 75 103 108 115 116 117 130 140 146",
)
TEST_ROIS = _table(
    ROIs1158="106", ROIs1868="73 100 119 142", ROIs1970="20 132 139", ROIs2017="32 63 103 108 140"
)
VAL_ROIS = _table(ROIs1868="17 127", ROIs1970="65", ROIs2017="22 117")
N_ROIS = {"all": 53, "train": 35, "val": 5, "test": 13}  # ROI counts of the published split (same source)

_NAME = re.compile(r"^(s1|s2)_(ROIs\d{4})_(\d+)_ImgNo_(\d+)_([^_]+)_patch_(\d+)\.tif$")


# -------------------------------------------------------------------------------------------- layout & splits


def split_of(region: str, roi: int) -> str | None:
    """The split ("train", "val" or "test") of an ROI, e.g. split_of("ROIs1868", 100) == "test"; None for an
    ROI that is not one of the 53."""
    roi = int(roi)
    if roi not in ROIS.get(region, ()):
        return None
    if roi in TEST_ROIS.get(region, ()):
        return "test"
    return "val" if roi in VAL_ROIS.get(region, ()) else "train"


def rois_of(split: str) -> list[tuple[str, int]]:
    """The (region, ROI number) pairs of a split, sorted."""
    _check_choice("split", split, SPLITS)
    return sorted((r, n) for r, ns in ROIS.items() for n in ns if split == "all" or split_of(r, n) == split)


def sen12mscr_overlap() -> dict[str, list[tuple[str, int]]]:
    """SEN12MS-CR-TS ROIs that SEN12MS-CR (``sen12mscr``'s tables, same ROI numbers) puts in another split.

    Keys "<ts split> in sen12mscr <split>[ (legacy)]", e.g. "test in sen12mscr train"; each a sorted list of
    (region, n). A SEN12MS-CR ROI that is on no list counts as exact-protocol train whether or not it exists.
    """
    seasons = {season.split("_")[0]: season for season in sen12mscr.SEASONS}
    found: dict[str, list[tuple[str, int]]] = {}
    for region, n in rois_of("all"):
        season, roi, ts_split = seasons[region], f"s1_{n}", split_of(region, n)
        cr_split = sen12mscr.split_of(season, roi)
        if cr_split != ts_split:
            found.setdefault(f"{ts_split} in sen12mscr {cr_split}", []).append((region, n))
        if ts_split != "train" and roi in sen12mscr.LEGACY_TRAIN_ROIS[season]:
            found.setdefault(f"{ts_split} in sen12mscr train (legacy)", []).append((region, n))
    return found


@dataclasses.dataclass(frozen=True)
class Series:
    """One SEN12MS-CR-TS patch with all its dates, in date-index order (index t is ImgNo t).

    id: "<region>_<n>_p<k>"; region: e.g. "ROIs1868"; roi: n; patch: k; s1, s2: the files of each date;
    s1_dates, s2_dates: their acquisition dates (each strictly increasing).
    """

    id: str
    region: str
    roi: int
    patch: int
    s1: tuple[Path, ...]
    s2: tuple[Path, ...]
    s1_dates: tuple[datetime.date, ...]
    s2_dates: tuple[datetime.date, ...]

    def __len__(self) -> int:
        return len(self.s2)


def series_file(root: str | os.PathLike, kind: str, region: str, roi: int, t: int, date, patch: int) -> Path:
    """The path of one file in the official layout; `kind` "s1" or "s2", `date` a datetime.date or a string
    (e.g. "*" for an unknown one)."""
    date = date.isoformat() if isinstance(date, datetime.date) else str(date)
    name = f"{kind}_{region}_{roi}_ImgNo_{t}_{date}_patch_{patch}.tif"
    return Path(root) / region / str(roi) / kind.upper() / str(t) / name


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def find_series(root: str | os.PathLike, split: str = "all") -> list[Series]:
    """All patches of `split` under root, sorted by (region, ROI, patch). Opens no file (names only).

    Raises FileNotFoundError when root does not exist, ValueError when it holds no ROI folder of the split,
    and DataError naming the file or folder for any problem with the layout (see the module docstring).
    """
    _check_choice("split", split, SPLITS)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: SEN12MS-CR-TS root directory does not exist")
    found = []
    for region, n in rois_of(split):
        roi_dir = root / region / str(n)
        if roi_dir.is_dir():
            found.extend(_scan_roi(root, region, n))
        else:
            logger.debug("ROI %s/%d (split %s) not under %s", region, n, split, root)
    if not found:
        raise ValueError(
            f"{root}: no SEN12MS-CR-TS patch of split {split!r} found; expected e.g. "
            f"{series_file(root, 's2', 'ROIs1868', 17, 0, '2018-01-03', 42)}"
        )
    return found


def _date_folders(roi_dir: Path, kind: str) -> int:
    """The number of date folders <roi_dir>/<KIND>/<t> (t = 0..N-1, no gap); DataError otherwise."""
    folder = roi_dir / kind.upper()
    if not folder.is_dir():
        raise DataError(folder, f"{kind.upper()} folder of ROI {roi_dir.name} does not exist")
    numbers = sorted(int(e.name) for e in os.scandir(folder) if e.is_dir() and e.name.isdigit())
    if not numbers:
        raise DataError(folder, "holds no date folder 0, 1, ...")
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if missing:
        raise DataError(
            folder / str(missing[0]), f"date folder missing (found {len(numbers)} of 0..{numbers[-1]})"
        )
    return len(numbers)


def _list_date(root: Path, kind: str, region: str, roi: int, t: int) -> dict[int, tuple[Path, datetime.date]]:
    """patch number -> (file, date) of one date folder; files with other names are ignored."""
    folder = root / region / str(roi) / kind.upper() / str(t)
    out = {}
    for name in sorted(os.listdir(folder)):
        m = _NAME.match(name)
        if not m or m.groups()[:4] != (kind, region, str(roi), str(t)):
            logger.debug(
                "ignoring %s (not named %s)",
                folder / name,
                series_file("", kind, region, roi, t, "<date>", 0).name,
            )
            continue
        try:
            date = datetime.date.fromisoformat(m.group(5))
        except ValueError as e:
            raise DataError(folder / name, f"date {m.group(5)!r} in the file name is not YYYY-MM-DD") from e
        out[int(m.group(6))] = (folder / name, date)
    return out


def _scan_roi(root: Path, region: str, roi: int) -> list[Series]:
    roi_dir = root / region / str(roi)
    n2, n1 = _date_folders(roi_dir, "s2"), _date_folders(roi_dir, "s1")
    if n1 != n2:
        extra = "S1" if n1 > n2 else "S2"
        raise DataError(
            roi_dir / extra / str(min(n1, n2)), f"date folder without a partner: S2 has {n2}, S1 {n1}"
        )
    listings = {kind: [_list_date(root, kind, region, roi, t) for t in range(n2)] for kind in ("s1", "s2")}
    patches = sorted({k for kind in listings.values() for date in kind for k in date})
    series = []
    for k in patches:
        files = {}
        for kind, other in (("s2", "s1"), ("s1", "s2")):
            for t, listing in enumerate(listings[kind]):
                if k not in listing:
                    expected = series_file(root, kind, region, roi, t, "*", k)
                    partner = listings[other][t].get(k, (None,))[0]
                    why = f"missing {kind.upper()} file of date {t} of patch {k}" + (
                        f" (partner of {partner})" if partner else ""
                    )
                    raise DataError(expected, why)
            files[kind] = [listing[k] for listing in listings[kind]]
            _check_order(files[kind])
        series.append(
            Series(
                id=f"{region}_{roi}_p{k}",
                region=region,
                roi=roi,
                patch=k,
                s1=tuple(p for p, _ in files["s1"]),
                s2=tuple(p for p, _ in files["s2"]),
                s1_dates=tuple(d for _, d in files["s1"]),
                s2_dates=tuple(d for _, d in files["s2"]),
            )
        )
    return series


def _check_order(files: list[tuple[Path, datetime.date]]) -> None:
    for (before, d0), (path, d1) in itertools.pairwise(files):
        if d1 <= d0:
            raise DataError(
                path, f"date {d1} is not after {d0}, the date of the previous date index ({before})"
            )


# ----------------------------------------------------------------------------------------------- date choice


@dataclasses.dataclass(frozen=True)
class DateChoice:
    """Which dates of a series are the inputs (increasing indices) and which the target; `match`: whether the
    inputs met the coverage range and the target is clear (UnCRtainTS's "coverage bin")."""

    inputs: tuple[int, ...]
    target: int
    match: bool


def select_dates_fixed(
    coverage: Sequence[float],
    n_inputs: int = 3,
    min_cov: float = 0.0,
    max_cov: float = 1.0,
    *,
    exclude_target: bool = False,
    clear_threshold: float = CLEAR_THRESHOLD,
) -> DateChoice:
    """UnCRtainTS's fixed sampler (its val/test choice): target the earliest least cloudy date; inputs the
    first `n_inputs` dates with coverage in [min_cov, max_cov] or, when fewer are, the first `n_inputs` dates
    other than the target (match False). The target may be among the inputs unless `exclude_target`."""
    coverage = _checked_coverage(coverage, n_inputs)
    target = int(np.argmin(coverage))
    in_range = [
        t for t, c in enumerate(coverage) if min_cov <= c <= max_cov and not (exclude_target and t == target)
    ]
    match = len(in_range) >= n_inputs
    inputs = in_range[:n_inputs] if match else [t for t in range(len(coverage)) if t != target][:n_inputs]
    return DateChoice(tuple(inputs), target, bool(match and coverage[target] <= clear_threshold))


def select_dates_random(
    coverage: Sequence[float],
    n_inputs: int,
    rng: np.random.Generator,
    *,
    clear_threshold: float = CLEAR_THRESHOLD,
) -> DateChoice:
    """UnCRtainTS's random sampler (its default for train): target a random clear date (coverage below
    `clear_threshold`), else the least cloudy one; inputs the other dates of the middle one of the windows
    of n_inputs + 1 consecutive dates that contain the target. `match` is always True, as there."""
    coverage = _checked_coverage(coverage, n_inputs)
    clear = np.flatnonzero(coverage < clear_threshold)
    target = int(clear[rng.integers(len(clear))]) if len(clear) else int(np.argmin(coverage))
    starts = [s for s in range(len(coverage) - n_inputs) if s <= target <= s + n_inputs]
    start = starts[len(starts) // 2]
    return DateChoice(tuple(t for t in range(start, start + n_inputs + 1) if t != target), target, True)


def _checked_coverage(coverage: Sequence[float], n_inputs: int) -> np.ndarray:
    coverage = np.asarray(coverage, dtype=np.float64)
    if coverage.ndim != 1 or not np.all(np.isfinite(coverage)):
        raise ValueError(f"coverage must be a 1-D sequence of finite numbers, got {coverage!r}")
    if not 1 <= n_inputs < len(coverage):
        raise ValueError(
            f"n_inputs must be in [1, {len(coverage) - 1}] for {len(coverage)} dates, got {n_inputs}"
        )
    return coverage


@functools.lru_cache(maxsize=1)
def _mask_detector():
    from s2cloudless import S2PixelCloudDetector  # imports lightgbm: only when coverage is computed

    return S2PixelCloudDetector(threshold=0.4, all_bands=True, average_over=4, dilation_size=2)


def cloud_coverage(series: Series, dates: Sequence[int] | None = None) -> list[float]:
    """Cloud coverage of each date (all when None) of a series: the mean of UnCRtainTS's default s2cloudless
    mask of its S2 file (1.0 for an all-zero image). Reads the files (DataError as ``read_series``)."""
    dates = range(len(series)) if dates is None else dates
    out = []
    with rasterio.Env(**GDAL_ENV), ExitStack() as stack:
        for t in dates:
            path = series.s2[t]
            ds = open_geotiff(path, stack, "Sentinel-2", count=len(S2_BANDS), dtypes=S2_DTYPES)
            all_bands = list(range(1, len(S2_BANDS) + 1))
            x = sen12mscr.s2_pixels(sen12mscr.read_pixels(ds, path, all_bands), path)  # clipped DN / 10000
            if (
                x.mean() * S2_DN_MAX < 1e-5 and x.std() * S2_DN_MAX < 1e-5
            ):  # blank: UnCRtainTS calls it cloudy
                out.append(1.0)
                continue
            out.append(float(np.mean(_mask_detector().get_cloud_masks(x[None])[0])))
    return out


# ---------------------------------------------------------------------------------------------------- reading


def _days(dates: Sequence[datetime.date]) -> np.ndarray:
    return np.array([(d - S1_LAUNCH).days for d in dates], dtype=np.int32)


def read_series(
    series: Series,
    inputs: Sequence[int],
    target: int,
    bands: None | str | Sequence[int | str] = None,
    *,
    s1_max_nonfinite: float = S1_MAX_NONFINITE_FRACTION,
) -> dict[str, Any]:
    """Read and validate the input dates `inputs` (strictly increasing date indices) and the target date.

    Returns "s2_cloudy" (T, H, W, C) and "s1" (T, H, W, 2) of the inputs in date order, "s2" (H, W, C) of the
    target, all float32 in [0, 1] (bands: see ``resolve_bands``; S1 VV, VH); "dates" and "s1_dates" (ISO
    strings of the inputs' S2 and S1 acquisitions), "target_date"; "days" and "s1_days" (T,) int32 days
    since ``S1_LAUNCH`` (UnCRtainTS's "S2 TD" / "S1 TD"); "input_index" (T,) int32, "target_index" int;
    "id"; "crs" and "transform" of the target S2 file. DataError names the offending file.
    """
    inputs = [int(t) for t in inputs]
    n = len(series)
    if (
        not inputs
        or any(not 0 <= t < n for t in [*inputs, target])
        or any(b <= a for a, b in itertools.pairwise(inputs))
    ):
        raise ValueError(
            f"inputs {inputs} must be strictly increasing and, like target {target}, in [0, {n - 1}]"
        )
    band_idx = [i + 1 for i in resolve_bands(bands)]
    with rasterio.Env(**GDAL_ENV), ExitStack() as stack:
        ref = open_geotiff(series.s2[target], stack, "Sentinel-2", count=len(S2_BANDS), dtypes=S2_DTYPES)
        grid = {"grid_of": (ref, series.s2[target])}
        s2_cloudy, s1 = [], []
        for t in inputs:
            s2_path, s1_path = series.s2[t], series.s1[t]
            ds2 = open_geotiff(s2_path, stack, "Sentinel-2", count=len(S2_BANDS), dtypes=S2_DTYPES, **grid)
            ds1 = open_geotiff(s1_path, stack, "Sentinel-1", count=len(S1_BANDS), dtypes=S1_DTYPES, **grid)
            s2_cloudy.append(sen12mscr.s2_pixels(sen12mscr.read_pixels(ds2, s2_path, band_idx), s2_path))
            s1_db = sen12mscr.read_pixels(ds1, s1_path, [1, 2])
            s1.append(sen12mscr.s1_pixels(s1_db, s1_path, s1_max_nonfinite))
        return {
            "s2_cloudy": np.stack(s2_cloudy),
            "s1": np.stack(s1),
            "s2": sen12mscr.s2_pixels(sen12mscr.read_pixels(ref, series.s2[target], band_idx),
                                      series.s2[target]),
            "dates": tuple(series.s2_dates[t].isoformat() for t in inputs),
            "s1_dates": tuple(series.s1_dates[t].isoformat() for t in inputs),
            "target_date": series.s2_dates[target].isoformat(),
            "days": _days([series.s2_dates[t] for t in inputs]),
            "s1_days": _days([series.s1_dates[t] for t in inputs]),
            "input_index": np.array(inputs, dtype=np.int32),
            "target_index": int(target),
            "id": series.id,
            "crs": ref.crs,
            "transform": ref.transform,
        }


def read_sample(
    series: Series,
    n_inputs: int = 3,
    bands: None | str | Sequence[int | str] = None,
    *,
    sampler: str = "fixed",
    coverage: Sequence[float] | None = None,
    rng: np.random.Generator | None = None,
    min_cov: float = 0.0,
    max_cov: float = 1.0,
    exclude_target: bool = False,
) -> dict[str, Any]:
    """``read_series`` on the dates UnCRtainTS would pick: `sampler` "fixed" (``select_dates_fixed``, its
    val/test choice) or "random" (``select_dates_random`` with `rng`, its train default). `coverage` (one
    value per date) defaults to ``cloud_coverage`` of all dates. Adds "coverage" (T,) float32 of the inputs,
    "target_coverage" and "match"."""
    _check_choice("sampler", sampler, ("fixed", "random"))
    coverage = cloud_coverage(series) if coverage is None else list(coverage)
    if len(coverage) != len(series):
        raise ValueError(f"{series.id}: {len(coverage)} coverage values for {len(series)} dates")
    if sampler == "fixed":
        choice = select_dates_fixed(coverage, n_inputs, min_cov, max_cov, exclude_target=exclude_target)
    else:
        if rng is None:
            raise ValueError("sampler='random' needs rng (a numpy Generator)")
        choice = select_dates_random(coverage, n_inputs, rng)
    sample = read_series(series, choice.inputs, choice.target, bands)
    sample["coverage"] = np.array([coverage[t] for t in choice.inputs], dtype=np.float32)
    sample["target_coverage"] = float(coverage[choice.target])
    sample["match"] = choice.match
    return sample


# -------------------------------------------------------------------------------------------------- synthetic

# One train, one validation and one test ROI: the default generated copy has all three splits.
SYNTHETIC_ROIS = (("ROIs1868", 36), ("ROIs2017", 22), ("ROIs1158", 106))
_SYNTHETIC_START = datetime.date(2018, 1, 2)
_SEASON_OF = {season.split("_")[0]: season for season in sen12mscr.SEASONS}


def synthetic_series(region: str, roi: int, patch: int, n_dates: int = 6, size: int = 16, seed: int = 0):
    """The arrays and dates ``write_synthetic_sen12mscr_ts`` writes for one patch, deterministic.

    Returns s1 (T, H, W, 2) float32 dB, s2 (T, H, W, 13) uint16 DN, s1_dates and s2_dates (T datetime.date,
    strictly increasing, S1 0-2 days before S2), clear (the one cloud-free date index) and cover (T,) the
    thick-cloud fraction of each date (0 on the clear one). One ground (``synthetic.synthetic_scene``) seen
    on every date under clouds of a different cover, S1 with a different offset of up to about 1 dB per date.
    """
    if n_dates < 2:
        raise ValueError(f"n_dates must be at least 2, got {n_dates}")
    scene_seed = int(
        np.random.SeedSequence([int(seed), REGIONS.index(region), int(roi), int(patch)]).generate_state(1)[0]
    )
    rng = np.random.default_rng(scene_seed)
    clear = int(rng.integers(n_dates))
    cover = np.where(np.arange(n_dates) == clear, 0.0, rng.uniform(0.1, 0.9, n_dates))
    season = _SEASON_OF[region]
    s2, s1 = [], []
    for t in range(n_dates):
        scene = synthetic.synthetic_scene(size, seed=scene_seed, season=season, cloud_cover=float(cover[t]))
        s2.append(scene["s2"] if t == clear else scene["s2_cloudy"])
        s1.append(scene["s1"] + rng.normal(0.0, 0.5, 2).astype(np.float32))
    s2_days = 12 * np.arange(n_dates) + rng.integers(0, 5, n_dates)
    s1_days = s2_days - rng.integers(0, 3, n_dates)
    return {
        "s1": np.stack(s1).astype(np.float32),
        "s2": np.stack(s2),
        "s1_dates": tuple(_SYNTHETIC_START + datetime.timedelta(days=int(d)) for d in s1_days),
        "s2_dates": tuple(_SYNTHETIC_START + datetime.timedelta(days=int(d)) for d in s2_days),
        "clear": clear,
        "cover": cover,
    }


def write_synthetic_sen12mscr_ts(
    root: str | os.PathLike,
    rois: Sequence[tuple[str, int]] = SYNTHETIC_ROIS,
    n_patches: int = 2,
    n_dates: int = 6,
    size: int = 16,
    seed: int = 0,
) -> list[str]:
    """Writes a small SEN12MS-CR-TS copy in the official layout under root; returns the ids, sorted.

    Each (region, ROI) of `rois` gets `n_patches` patches (numbers 0, 5, 10, ...) of `n_dates` dates, each a
    `size` x `size` pixel S1 (float32 dB) and S2 (uint16 DN) GeoTIFF on one UTM grid per patch (10 m pixels,
    neighbouring tiles); content from ``synthetic_series``. Files are overwritten.
    """
    ids = []
    for region, roi in rois:
        crs = rasterio.crs.CRS.from_epsg(32601 + (int(roi) * 7) % 60)
        for i in range(n_patches):
            patch = 5 * i
            arrays = synthetic_series(region, roi, patch, n_dates, size, seed)
            transform = rasterio.transform.from_origin(300_000.0 + 10.0 * size * i, 5_000_000.0, 10.0, 10.0)
            for t in range(n_dates):
                for kind in ("s1", "s2"):
                    path = series_file(root, kind, region, roi, t, arrays[f"{kind}_dates"][t], patch)
                    _write_tif(path, arrays[kind][t], crs, transform)
            ids.append(f"{region}_{roi}_p{patch}")
    return sorted(ids)


def _write_tif(path: Path, array: np.ndarray, crs, transform) -> None:
    """(H, W, C) array -> an uncompressed GeoTIFF of its dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, count = array.shape
    profile = {
        "driver": "GTiff",
        "dtype": array.dtype.name,
        "count": count,
        "height": height,
        "width": width,
        "crs": crs,
        "transform": transform,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(np.moveaxis(array, -1, 0)))
