"""SEN12MS-CR on disk: layout discovery, exact splits, validated GeoTIFF reading and normalisation.

Layout (the dataset's official one; ``n`` is the scene number, ``k`` the patch number)::

    <root>/ROIs1158_spring_s1/s1_<n>/ROIs1158_spring_s1_<n>_p<k>.tif                 S1, float32 dB, 2 bands
    <root>/ROIs1158_spring_s2/s2_<n>/ROIs1158_spring_s2_<n>_p<k>.tif                 S2, uint16 DN, 13 bands
    <root>/ROIs1158_spring_s2_cloudy/s2_cloudy_<n>/ROIs1158_spring_s2_cloudy_<n>_p<k>.tif      S2 cloudy
    ... likewise for ROIs1868_summer, ROIs1970_fall, ROIs2017_winter.

A triplet is named by its S1 scene folder (``Triplet.roi == "s1_106"``, the spelling of the split lists) and
its id is ``<season>_<n>_p<k>``, e.g. ``ROIs1158_spring_106_p30``.

Splits. ``TEST_ROIS`` and ``VAL_ROIS`` are the ROI lists of UnCRtainTS / EMRDM; everything else is train.

- ``protocol="exact"`` (default): a patch belongs to a split when its season and S1 folder name equal an
  entry. The three splits are disjoint.
- ``protocol="legacy"`` reproduces UnCRtainTS's ``SEN12MSCR.get_paths`` (data/dataLoader.py), which EMRDM
  reuses: train is UnCRtainTS's explicit list ``LEGACY_TRAIN_ROIS`` (scenes on no list are dropped), and a
  patch belongs to a split when ANY entry ``"<season>_s1/s1_<n>"`` of that split is a *substring* of the
  patch's S1 path. So train entry ``ROIs1158_spring_s1/s1_1`` also claims ``.../s1_106/...``: 6 of the 10 test
  ROIs (spring 106, 123, 140; summer 119, 73; fall 139) and 3 val ROIs (spring 17, fall 65, winter 84) are in
  legacy train too. We test against the path relative to the root (``<season>_s1/s1_<n>/<file>``); UnCRtainTS
  tests the absolute path, which differs only for a root whose own name contains a split entry. Use legacy
  only to reproduce published numbers.

Normalisation, band names and selections, and the GeoTIFF checks are the data contract's
(``crrf_jax.data.contract``; docs/ARCHITECTURE.md, "Data contract"): S1 dB clipped to [-25, 0] and mapped to
[0, 1]; S2 DN clipped to [0, 10000] and divided by 10000.

Validation. Every problem with a file raises ``DataError`` whose message starts with that file's path: missing
partner, unreadable or truncated TIFF, wrong band count (S1 2, S2 13), wrong dtype (S1 float32/float64; S2
uint16, or float32/float64 DN), partners off the clear S2 file's grid (``contract.check_same_grid``: size,
CRS, transform within a thousandth of a pixel), and non-finite pixels under this policy:

- S2 (clear or cloudy): any NaN/Inf is an error (the official files are uint16 and cannot hold one).
- S1: real SEN12MS-CR S1 patches contain NaN pixels (no-data at swath borders). UnCRtainTS maps them, after
  clipping and rescaling, to 0 with ``np.nan_to_num``, i.e. to the -25 dB floor. We do the same, counting
  every non-finite value (NaN, +-Inf) and filling it with ``contract.S1_NONFINITE_FILL`` (0.0 = -25 dB), as
  long as the fraction of non-finite values in what was read is at most ``S1_MAX_NONFINITE_FRACTION`` (10 %,
  adjustable per call); above that the patch is mostly no-data and is rejected.

Checks apply to what is read: with a window or a band subset only those pixels are checked for non-finite
values.

Bad samples. ``read_triplet`` raises. ``read_triplet_or_none(..., on_error="skip", bad_samples=log)`` returns
None for a sample that raises ``DataError`` and records it in a ``BadSampleLog`` (id, file, reason), which
logs one warning per sample and keeps the count (``log.count``). A log lives in one process: a multi-process
loader keeps one per worker and sums them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from crrf_jax.data.contract import (
    GDAL_ENV,
    S1_BANDS,
    S1_DTYPES,
    S2_BANDS,
    S2_DTYPES,
    DataError,
    normalize_s1,
    normalize_s1_filled,
    normalize_s2,
    open_geotiff,
    resolve_bands,
)

logger = logging.getLogger(__name__)

SEASONS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
SPLITS = ("train", "val", "test", "all")
PROTOCOLS = ("exact", "legacy")

S1_MAX_NONFINITE_FRACTION = 0.1


def _rois(numbers: str) -> frozenset[str]:
    return frozenset(f"s1_{n}" for n in numbers.split())


TEST_ROIS: dict[str, frozenset[str]] = {
    "ROIs1158_spring": _rois("106 123 140 31 44"),
    "ROIs1868_summer": _rois("119 73"),
    "ROIs1970_fall": _rois("139"),
    "ROIs2017_winter": _rois("108 63"),
}
VAL_ROIS: dict[str, frozenset[str]] = {
    "ROIs1158_spring": _rois("17"),
    "ROIs1868_summer": _rois("19 80 127 17"),
    "ROIs1970_fall": _rois("65"),
    "ROIs2017_winter": _rois("22 107 130 84"),
}
# UnCRtainTS's explicit train list (SEN12MSCR.splits['train']); used only by protocol="legacy".
LEGACY_TRAIN_ROIS: dict[str, frozenset[str]] = {
    "ROIs1158_spring": _rois(
        "9 1 124 40 101 21 134 145 141 66 8 26 77 113 100 117 119 6 58 120 110 126 115 121 39 109 63 75 "
        "132 128 142 15 45 97 147"
    ),
    "ROIs1868_summer": _rois(
        "90 87 25 124 114 135 40 101 42 31 36 139 56 133 55 43 113 76 123 143 93 125 89 120 126 72 115 121 "
        "146 140 95 102 7 11 132 15 137 4 27 147 86 47 100"
    ),
    "ROIs1970_fall": _rois(
        "3 22 148 107 1 114 135 40 42 31 149 64 28 144 57 35 133 30 134 141 112 116 37 26 77 100 83 71 93 "
        "119 104 136 6 41 125 91 131 120 110 19 14 81 39 109 33 88 11 128 142 122 4 27 147 85 82 105"
    ),
    "ROIs2017_winter": _rois("68 25 62 135 42 64 21 55 112 116 8 59 49 104 81 146 75 94 102 61 47"),
}

class EmptySplitError(ValueError):
    """find_triplets: the root holds triplets, but none in the requested split (e.g. a partial copy)."""


# -------------------------------------------------------------------------------------------- layout & splits


@dataclasses.dataclass(frozen=True)
class Triplet:
    """One SEN12MS-CR patch: co-registered S1, clear S2 and cloudy S2 files.

    id: "<season>_<n>_p<k>", e.g. "ROIs1158_spring_106_p30"; season: e.g. "ROIs1158_spring"; roi: the S1 scene
    folder name "s1_<n>" (the spelling of ``TEST_ROIS`` / ``VAL_ROIS``); patch: k.
    """

    id: str
    season: str
    roi: str
    patch: int
    s1: Path
    s2: Path
    s2_cloudy: Path

    @property
    def scene(self) -> int:
        """The scene number n of ``roi == "s1_<n>"``."""
        return int(self.roi.split("_", 1)[1])


def make_triplet(root: str | os.PathLike, season: str, scene: int, patch: int) -> Triplet:
    """The Triplet for (season, scene n, patch k) under root, whether or not its files exist."""
    root = Path(root)
    return Triplet(
        id=f"{season}_{scene}_p{patch}",
        season=season,
        roi=f"s1_{scene}",
        patch=patch,
        s1=root / f"{season}_s1" / f"s1_{scene}" / f"{season}_s1_{scene}_p{patch}.tif",
        s2=root / f"{season}_s2" / f"s2_{scene}" / f"{season}_s2_{scene}_p{patch}.tif",
        s2_cloudy=root
        / f"{season}_s2_cloudy"
        / f"s2_cloudy_{scene}"
        / f"{season}_s2_cloudy_{scene}_p{patch}.tif",
    )


def split_of(season: str, roi: str) -> str:
    """Exact-protocol split ("train", "val" or "test") of a scene: split_of("ROIs1158_spring", "s1_106")."""
    if roi in TEST_ROIS.get(season, ()):
        return "test"
    if roi in VAL_ROIS.get(season, ()):
        return "val"
    return "train"


@functools.cache
def _legacy_entries(split: str) -> tuple[str, ...]:
    lists = {"train": [LEGACY_TRAIN_ROIS], "val": [VAL_ROIS], "test": [TEST_ROIS]}
    lists["all"] = lists["train"] + lists["test"] + lists["val"]
    return tuple(
        f"{season}_s1/{roi}" for table in lists[split] for season, rois in table.items() for roi in rois
    )


def in_split(triplet: Triplet, split: str, protocol: str = "exact") -> bool:
    """Whether triplet belongs to split under protocol (see the module docstring)."""
    _check_choice("split", split, SPLITS)
    _check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "exact":
        return split == "all" or split_of(triplet.season, triplet.roi) == split
    rel_path = f"{triplet.season}_s1/{triplet.roi}/{triplet.s1.name}"
    return any(entry in rel_path for entry in _legacy_entries(split))


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def find_triplets(
    root: str | os.PathLike,
    split: str = "all",
    protocol: str = "exact",
    *,
    on_error: str = "raise",
    bad_samples: BadSampleLog | None = None,
) -> list[Triplet]:
    """All triplets of split under root, sorted by id. Opens no file (existence checks only).

    Scans ``<root>/<season>_s1/s1_<n>/<season>_s1_<n>_p<k>.tif`` for the seasons present; other files are
    ignored with a debug message. A missing S2 or S2-cloudy partner raises DataError naming the missing file
    (``on_error="skip"``: the triplet is dropped and recorded in ``bad_samples``). Raises FileNotFoundError
    when root does not exist, ValueError when it holds no triplet and EmptySplitError (a ValueError) when it
    holds none of the requested split.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("protocol", protocol, PROTOCOLS)
    _check_choice("on_error", on_error, ("raise", "skip"))
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: SEN12MS-CR root directory does not exist")
    candidates = [t for season in SEASONS for t in _scan_season(root, season)]
    if not candidates:
        raise ValueError(
            f"{root}: no SEN12MS-CR triplets found; expected e.g. "
            f"{root}/ROIs1158_spring_s1/s1_106/ROIs1158_spring_s1_106_p30.tif (seasons: {', '.join(SEASONS)})"
        )
    selected = [t for t in candidates if in_split(t, split, protocol)]
    if not selected:
        raise EmptySplitError(
            f"{root}: split {split!r} (protocol {protocol!r}) holds no triplet; "
            f"none of the {len(candidates)} triplets found is in it"
        )
    listings: dict[Path, set[str]] = {}

    def exists(path: Path) -> bool:
        if path.parent not in listings:
            listings[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        return path.name in listings[path.parent]

    triplets = []
    for t in selected:
        missing = next((p for p in (t.s2, t.s2_cloudy) if not exists(p)), None)
        if missing is None:
            triplets.append(t)
            continue
        err = DataError(missing, f"missing partner file of {t.s1} (triplet {t.id})")
        if on_error == "raise":
            raise err
        (bad_samples if bad_samples is not None else BadSampleLog()).record(t.id, err)
    return sorted(triplets, key=lambda t: t.id)


def _scan_season(root: Path, season: str) -> list[Triplet]:
    season_dir = root / f"{season}_s1"
    if not season_dir.is_dir():
        return []
    file_pattern = re.compile(rf"^{season}_s1_(\d+)_p(\d+)\.tif$")
    found = []
    for folder in sorted(os.scandir(season_dir), key=lambda e: e.name):
        folder_match = re.fullmatch(r"s1_(\d+)", folder.name)
        if not folder.is_dir() or not folder_match:
            logger.debug("ignoring %s (not an s1_<n> folder)", folder.path)
            continue
        for name in sorted(os.listdir(folder.path)):
            m = file_pattern.match(name)
            if not m or m.group(1) != folder_match.group(1):
                logger.debug(
                    "ignoring %s (not named %s_s1_<n>_p<k>.tif)", os.path.join(folder.path, name), season
                )
                continue
            found.append(make_triplet(root, season, int(m.group(1)), int(m.group(2))))
    return found


# ---------------------------------------------------------------------------------------------------- reading


def check_window(window: Window | None, height: int, width: int) -> Window:
    """window as an integer Window inside a height x width raster (None: all of it); ValueError if outside."""
    if window is None:
        return Window(0, 0, width, height)
    vals = (window.col_off, window.row_off, window.width, window.height)
    if any(float(v) != int(v) for v in vals):
        raise ValueError(f"window must have integer offsets and sizes, got {window}")
    col, row, w, h = (int(v) for v in vals)
    if w <= 0 or h <= 0 or col < 0 or row < 0 or col + w > width or row + h > height:
        raise ValueError(f"window {window} is not inside the {height}x{width} patch")
    return Window(col, row, w, h)


def read_hwc(ds, path: Path, indexes: list[int], window: Window | None = None) -> np.ndarray:
    """Bands (1-based indexes) of window (None: the whole file) as stored, (H, W, C) in the file's dtype and
    C-contiguous: GDAL writes the bands straight into the channels-last buffer (no transposing copy
    afterwards). A DataError naming the file when it cannot be read."""
    height, width = (ds.height, ds.width) if window is None else (int(window.height), int(window.width))
    out = np.empty((height, width, len(indexes)), ds.dtypes[0])
    try:
        ds.read(indexes, window=window, out=np.moveaxis(out, -1, 0))
    except rasterio.errors.RasterioError as e:
        raise DataError(path, f"cannot read pixels, file truncated or corrupt? ({e})") from e
    return out


def read_pixels(ds, path: Path, indexes: list[int], window: Window | None = None) -> np.ndarray:
    """`read_hwc` as float32 (H, W, C) (shared with the SEN12MS-CR-TS reader)."""
    return read_hwc(ds, path, indexes, window).astype(np.float32, copy=False)


def read_s2(ds, path: Path, indexes: list[int], window: Window | None = None, *, compact: bool = False):
    """S2 bands (1-based indexes) of window -> (H, W, C) float32 [0, 1] (`s2_pixels`). compact: a uint16
    file's DN as stored instead, (H, W, C) uint16 (`read_hwc`: no conversion, and no NaN check, since uint16
    holds none); float DN files are normalised either way."""
    if compact and ds.dtypes[0] == "uint16":
        return read_hwc(ds, path, indexes, window)
    return s2_pixels(read_pixels(ds, path, indexes, window), path)


def s2_pixels(data: np.ndarray, path: Path) -> np.ndarray:
    """S2 DN (H, W, C) -> [0, 1]; NaN/Inf is a DataError naming the file."""
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(path, f"{int(bad.sum())} non-finite (NaN/Inf) values in Sentinel-2 data")
    return normalize_s2(data)


def s1_pixels(data: np.ndarray, path: Path, max_nonfinite: float) -> np.ndarray:
    """S1 dB (H, W, 2) -> [0, 1], non-finite values filled unless more than `max_nonfinite` of them."""
    bad = ~np.isfinite(data)
    fraction = float(bad.mean())
    if fraction > max_nonfinite:
        raise DataError(
            path,
            f"{fraction:.1%} of Sentinel-1 values are NaN/Inf (more than the {max_nonfinite:.1%} allowed)",
        )
    if not bad.any():
        return normalize_s1(data)
    logger.debug("%s: filling %d non-finite S1 values", path, int(bad.sum()))
    return normalize_s1_filled(data)


def read_triplet(
    triplet: Triplet,
    bands: None | str | Sequence[int | str] = None,
    window: Window | None = None,
    *,
    s1_max_nonfinite: float = S1_MAX_NONFINITE_FRACTION,
    compact: bool = False,
) -> dict[str, Any]:
    """Read and validate one triplet.

    Args:
      triplet: from ``find_triplets``.
      bands: S2 band selection, see ``resolve_bands`` (None: all 13, file order).
      window: optional ``rasterio.windows.Window`` (integer, inside the patch) for a partial read.
      s1_max_nonfinite: largest allowed fraction of non-finite S1 values (they are filled, see module docs).
      compact: S2 from uint16 files stays uint16 DN (`read_s2`; the pipeline's compact batches, made
        float32 by `contract.normalize_batch`); otherwise float32 [0, 1].

    Returns a dict: "s1" (H, W, 2) float32 [0, 1] (VV, VH); "s2", "s2_cloudy" (H, W, C) float32 [0, 1] (or
    uint16 DN, see compact); "id" str; "crs" (rasterio CRS) and "transform" (affine.Affine, of the window when
    given) of the S2 file.
    Raises DataError naming the offending file (see the module docstring).
    """
    band_idx = [i + 1 for i in resolve_bands(bands)]
    with rasterio.Env(**GDAL_ENV), ExitStack() as stack:
        s2 = open_geotiff(triplet.s2, stack, "Sentinel-2", count=len(S2_BANDS), dtypes=S2_DTYPES)
        partner = dict(grid_of=(s2, triplet.s2))
        s1 = open_geotiff(triplet.s1, stack, "Sentinel-1", count=len(S1_BANDS), dtypes=S1_DTYPES, **partner)
        s2c = open_geotiff(triplet.s2_cloudy, stack, "cloudy Sentinel-2", count=len(S2_BANDS),
                           dtypes=S2_DTYPES, **partner)
        win = check_window(window, s2.height, s2.width)
        return {
            "s1": s1_pixels(read_pixels(s1, triplet.s1, [1, 2], win), triplet.s1, s1_max_nonfinite),
            "s2": read_s2(s2, triplet.s2, band_idx, win, compact=compact),
            "s2_cloudy": read_s2(s2c, triplet.s2_cloudy, band_idx, win, compact=compact),
            "id": triplet.id,
            "crs": s2.crs,
            "transform": s2.transform if window is None else s2.window_transform(win),
        }


def read_s2_file(
    path: str | os.PathLike, bands: None | str | Sequence[int | str] = None, window: Window | None = None
) -> dict[str, Any]:
    """Read and validate one 13-band S2 GeoTIFF (clear or cloudy) on its own.

    Returns {"s2": (H, W, C) float32 [0, 1], "crs", "transform" (of the window when given)}; DataError on a
    bad file (as ``read_triplet``).
    """
    path = Path(path)
    band_idx = [i + 1 for i in resolve_bands(bands)]
    with rasterio.Env(**GDAL_ENV), ExitStack() as stack:
        ds = open_geotiff(path, stack, "Sentinel-2", count=len(S2_BANDS), dtypes=S2_DTYPES)
        win = check_window(window, ds.height, ds.width)
        return {
            "s2": s2_pixels(read_pixels(ds, path, band_idx, win), path),
            "crs": ds.crs,
            "transform": ds.window_transform(win),
        }


# ------------------------------------------------------------------------------------------------ bad samples


@dataclasses.dataclass(frozen=True)
class BadSample:
    id: str
    path: str
    reason: str


class BadSampleLog:
    """Records samples skipped because of a DataError: one warning each, and the count.

    >>> log = BadSampleLog()
    >>> sample = read_triplet_or_none(t, on_error="skip", bad_samples=log)   # None if t is bad
    >>> log.count, log.entries[0].reason
    """

    def __init__(self, log: logging.Logger | None = None):
        self._log = log or logger
        self.entries: list[BadSample] = []

    def record(self, sample_id: str, error: DataError) -> None:
        entry = BadSample(sample_id, error.path, error.reason)
        self.entries.append(entry)
        self._log.warning("skipping bad sample %s: %s: %s", entry.id, entry.path, entry.reason)

    @property
    def count(self) -> int:
        return len(self.entries)

    def summary(self) -> str:
        if not self.entries:
            return "no bad samples"
        lines = [f"{self.count} bad sample(s) skipped:"]
        lines += [f"  {e.id}: {e.path}: {e.reason}" for e in self.entries]
        return "\n".join(lines)


def read_triplet_or_none(
    triplet: Triplet,
    bands: None | str | Sequence[int | str] = None,
    window: Window | None = None,
    *,
    on_error: str = "raise",
    bad_samples: BadSampleLog | None = None,
    s1_max_nonfinite: float = S1_MAX_NONFINITE_FRACTION,
) -> dict[str, Any] | None:
    """``read_triplet``; with ``on_error="skip"`` a DataError returns None and is recorded in bad_samples.

    Only DataError (a bad file) is skipped; wrong arguments still raise.
    """
    _check_choice("on_error", on_error, ("raise", "skip"))
    try:
        return read_triplet(triplet, bands, window, s1_max_nonfinite=s1_max_nonfinite)
    except DataError as err:
        if on_error == "raise":
            raise
        (bad_samples if bad_samples is not None else BadSampleLog()).record(triplet.id, err)
        return None
