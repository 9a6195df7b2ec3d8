"""The data contract: what a sample holds, how files map to it, and how the networks see it.

Every module that reads, writes, normalises or displays SEN12MS-CR data takes its constants and conversions
from here; docs/ARCHITECTURE.md ("Data contract") describes the same in prose.

A sample (a batch adds a leading B, and evaluation batches a ``mask`` (B,) bool that is False on padding):

| key          | shape     | dtype   | range  | meaning                                                      |
| ------------ | --------- | ------- | ------ | ------------------------------------------------------------ |
| `s1`         | (H, W, 2) | float32 | [0, 1] | Sentinel-1 VV, VH: dB clipped to [-25, 0], mapped linearly;  |
|              |           |         |        | non-finite pixels are `S1_NONFINITE_FILL` (-25 dB)           |
| `s2`         | (H, W, C) | float32 | [0, 1] | cloud-free Sentinel-2 L1C: DN clipped to [0, 10000], / 10000 |
| `s2_cloudy`  | (H, W, C) | float32 | [0, 1] | the cloudy Sentinel-2 image, normalised like `s2`            |
| `cloud_prob` | (H, W, 1) | float32 | [0, 1] | s2cloudless probability on all 13 cloudy bands; cached as    |
|              |           |         |        | uint8 x 255 (`cloud_prob_to_uint8`, `cloud_prob_from_uint8`) |
| `id`         | ()        | str     |        | "<season>_<n>_p<k>", e.g. "ROIs1158_spring_106_p30"          |

Datasets without SAR have no `s1` (`OPTIONAL_KEYS`); multi-temporal datasets add a leading date axis T to
`TEMPORAL_KEYS` (docs/ARCHITECTURE.md, "Data contract", lists the datasets and their shapes).

C is the number of selected bands (`resolve_bands`: all 13 of `S2_BANDS` by default, in the selection's
order). Channels are last. The networks see every [0, 1] image through `to_model` (x * 2 - 1, so [-1, 1]) and
their image outputs go back through `from_model`; written predictions are uint16 DN (`denormalize_s2`).

Where the float32 form is made: the pipelines' batches stay compact on the host (`COMPACT_DTYPES`: s2 and
s2_cloudy uint16 DN, cloud_prob uint8 x 255; s1 float32), and `normalize_batch` makes the table's float32
as the first operation inside the jitted steps, bit-identical to `normalize_s2` / `cloud_prob_from_uint8`
on the host.

On disk: S1 GeoTIFFs hold 2 bands of float dB, S2 GeoTIFFs 13 bands of uint16 DN (float DN accepted), cloud
probability 1 band of uint8 x 255 (float in [0, 1] accepted from users). `open_geotiff` opens any of them and
checks its bands, dtype and grid, raising `DataError` naming the file.

This module sits at the bottom of the import graph: it imports nothing from crrf_jax outside crrf_jax.data,
and only NumPy at import time (rasterio when a file is opened), so the networks import it cheaply.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------- samples

ARRAY_KEYS = ("s1", "s2", "s2_cloudy", "cloud_prob")
KEYS = (*ARRAY_KEYS, "id")
# Keys a sample may lack: datasets without SAR (CUHK-CR, Sen2_MTC_New) have no `s1` at all (never zeros).
OPTIONAL_KEYS = ("s1",)
# Multi-temporal samples (Sen2_MTC_New, SEN12MS-CR-TS) carry these with a leading date axis T, dates in order:
# s2_cloudy (T, H, W, C), cloud_prob (T, H, W, 1), s1 (T, H, W, 2); the target s2 stays (H, W, C).
TEMPORAL_KEYS = ("s1", "s2_cloudy", "cloud_prob")


def array_keys(sample) -> tuple[str, ...]:
    """The `ARRAY_KEYS` a sample or batch holds, in `ARRAY_KEYS` order; a missing required key is a KeyError."""
    missing = [k for k in ARRAY_KEYS if k not in sample and k not in OPTIONAL_KEYS]
    if missing:
        raise KeyError(f"sample lacks the required keys {missing} (has {sorted(sample)})")
    return tuple(k for k in ARRAY_KEYS if k in sample)


def least_cloudy_dates(cloud_prob: np.ndarray, k: int) -> np.ndarray:
    """(..., T, H, W, 1) cloud probability -> (..., k) int: the k dates of lowest mean cloud probability (ties:
    the earlier date), in date order. The one rule for "the least cloudy dates" of a sample: the readers' k of T
    dates and the single date that evaluation scores multi-temporal inputs on (k = 1)."""
    prob = np.asarray(cloud_prob)
    if prob.ndim < 4 or not 1 <= k <= prob.shape[-4]:
        raise ValueError(f"least_cloudy_dates: need (..., T, H, W, 1) and 1 <= k <= T, got {prob.shape}, k={k}")
    order = np.argsort(prob.mean(axis=(-3, -2, -1)), axis=-1, kind="stable")
    return np.sort(order[..., :k], axis=-1)


S1_BANDS = ("VV", "VH")
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
RGB = (3, 2, 1)  # indices of B04, B03, B02 in S2_BANDS: true colour

# ------------------------------------------------------------------------------------------------ model range


def to_model(x):
    """A [0, 1] image (NumPy or JAX array) -> the [-1, 1] range the networks see."""
    return x * 2 - 1


def from_model(y):
    """A network's [-1, 1] image (NumPy or JAX array) -> [0, 1]; the inverse of `to_model` (not clipped)."""
    return (y + 1) / 2


# ---------------------------------------------------------------------------------------------- normalisation

S2_DN_MAX = 10000.0  # L1C digital numbers are reflectance x 10000
S1_DB_MIN, S1_DB_MAX = -25.0, 0.0
S1_NONFINITE_FILL = 0.0  # normalised value of non-finite S1 pixels: -25 dB, as UnCRtainTS's nan_to_num
CLOUD_PROB_SCALE = 255.0  # cached cloud probability: uint8 = round(probability x 255), error <= 1/510

S1_DTYPES = ("float32", "float64")
S2_DTYPES = ("uint16", "float32", "float64")
CLOUD_PROB_DTYPES = ("uint8", "float32", "float64")


def normalize_s2(dn: np.ndarray) -> np.ndarray:
    """S2 L1C digital numbers -> float32 reflectance in [0, 1] (clip to [0, 10000], divide by 10000)."""
    x = np.clip(np.asarray(dn, dtype=np.float32), 0.0, S2_DN_MAX)  # a new array: divided in place
    x /= np.float32(S2_DN_MAX)
    return x


def denormalize_s2(x: np.ndarray) -> np.ndarray:
    """[0, 1] reflectance (any float array, clipped first) -> uint16 DN in [0, 10000], rounded to nearest."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("denormalize_s2: input contains NaN or Inf")
    dn = np.clip(x, 0.0, 1.0)
    dn *= S2_DN_MAX  # in place: the same float32 products, without two more temporaries of x's size
    return np.rint(dn, out=dn).astype(np.uint16)


def normalize_s1(db: np.ndarray) -> np.ndarray:
    """S1 backscatter in dB -> float32 in [0, 1] (clip to [-25, 0] dB). Non-finite values stay non-finite."""
    db = np.asarray(db, dtype=np.float32)
    return ((np.clip(db, S1_DB_MIN, S1_DB_MAX) - S1_DB_MIN) / (S1_DB_MAX - S1_DB_MIN)).astype(np.float32)


def normalize_s1_filled(db: np.ndarray) -> np.ndarray:
    """`normalize_s1` with every non-finite value (NaN, +-Inf: no-data at swath borders) set to
    `S1_NONFINITE_FILL`. How many may be filled is the reader's policy."""
    db = np.asarray(db, dtype=np.float32)
    bad = ~np.isfinite(db)
    out = normalize_s1(np.where(bad, S1_DB_MIN, db))
    out[bad] = S1_NONFINITE_FILL
    return out


def denormalize_s1(x: np.ndarray) -> np.ndarray:
    """Inverse of `normalize_s1` on [0, 1] -> float32 dB in [-25, 0]."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    return (x * (S1_DB_MAX - S1_DB_MIN) + S1_DB_MIN).astype(np.float32)


def cloud_prob_to_uint8(prob: np.ndarray) -> np.ndarray:
    """Cloud probability in [0, 1] (clipped) -> its cached uint8 form, round(probability x 255)."""
    return np.rint(np.clip(prob, 0.0, 1.0) * CLOUD_PROB_SCALE).astype(np.uint8)


def cloud_prob_from_uint8(stored: np.ndarray) -> np.ndarray:
    """A cached uint8 cloud probability -> float32 in [0, 1]."""
    return np.asarray(stored).astype(np.float32) / CLOUD_PROB_SCALE


# -------------------------------------------------------------------------------------------- compact batches

# Host batches carry these keys in their stored, compact dtypes (half the bytes of float32 for S2, a quarter
# for the cloud map); `normalize_batch` turns them into the float32 contract, on the device as the first
# operation of every jitted step, or on the host for consumers that need floats there. Any float array is
# already the contract (S1 always is: its non-finite fill is decided per patch on the host).
COMPACT_DTYPES = {"s2": np.dtype(np.uint16), "s2_cloudy": np.dtype(np.uint16),
                  "cloud_prob": np.dtype(np.uint8)}


@functools.cache
def _tables() -> dict[np.dtype, np.ndarray]:
    """float32 lookup tables of the host conversions: DN 0..10000 -> `normalize_s2`, 0..255 ->
    `cloud_prob_from_uint8`. The device indexes them instead of dividing because XLA rewrites x / c into
    x * (1 / c), which rounds differently from the host's division (3186 of the 10001 DN values and 126 of the
    256 cloud-probability values on CPU)."""
    return {np.dtype(np.uint16): normalize_s2(np.arange(int(S2_DN_MAX) + 1, dtype=np.uint16)),
            np.dtype(np.uint8): cloud_prob_from_uint8(np.arange(256, dtype=np.uint8))}


def normalize_array(key: str, value, xp=None):
    """One batch entry -> the float32 contract: `key` "s2" / "s2_cloudy" as uint16 DN (clipped to 10000) and
    "cloud_prob" as uint8 x 255 are converted (bit-identical to `normalize_s2` / `cloud_prob_from_uint8`);
    floats become float32 (a float32 array passes through unchanged); other keys pass through.

    xp: None (JAX: jit-traceable, for the device) or numpy (the host). Another integer dtype for an image key
    is a TypeError naming it.
    """
    if key not in COMPACT_DTYPES:
        return value
    dtype = np.dtype(value.dtype)
    if dtype.kind == "f":
        return value if dtype == np.float32 else value.astype(np.float32)
    if dtype != COMPACT_DTYPES[key]:
        raise TypeError(f"batch[{key!r}] is {dtype}; the data contract takes {COMPACT_DTYPES[key]} (stored) "
                        f"or float32 in [0, 1]")
    if xp is np:
        return normalize_s2(value) if dtype == np.uint16 else cloud_prob_from_uint8(value)
    import jax.numpy as jnp  # here, not at the top: this module imports only NumPy

    table = jnp.asarray(_tables()[dtype])
    # mode="clip": DN above 10000 index the last entry, 1.0, as the host's clip gives
    return jnp.take(table, value.astype(jnp.int32), mode="clip")


def normalize_batch(batch: dict, xp=None) -> dict:
    """A batch (compact as the pipelines give it, or already float32) -> the float32 contract: the flips and
    rotations it carries applied (`flip_rotate_batch`), every entry through `normalize_array`; other keys
    (mask, id, cached latents) unchanged. Call it first inside jitted steps (xp None), or with xp=numpy on
    the host."""
    return {k: normalize_array(k, v, xp) for k, v in flip_rotate_batch(batch, xp).items()}


# Augmented batches carry each sample's flip and rotation still to apply, so that the host batches the
# patches as read: copying a rotated view is strided, about 5x slower than a contiguous copy (BENCHMARKS.md,
# Data pipeline), while on the device the transform fuses into the step's first operations.
FLIP_ROTATE = "flip_rotate"  # (B, 2) int8: 90-degree turns counter-clockwise (0-3), then a left-right flip


def flip_rotate_batch(batch: dict, xp=None) -> dict:
    """A batch carrying `FLIP_ROTATE` -> without it, each sample of every image entry ((B, H, W, C), or
    (B, T, H, W, C) alike on every date) turned and flipped as ``np.flip(np.rot90(x, turns, (H, W)), W)``
    (flip only when set) would; a batch without the key comes back as it is. Exact for any dtype: selects
    between reversed and transposed copies, so it commutes with `normalize_array`. Odd turns need square
    images (the pipeline draws only 0 or 2 for others; the host checks, a jitted step cannot).

    xp: None (JAX) or numpy."""
    if FLIP_ROTATE not in batch:
        return batch
    if xp is None:
        import jax.numpy as xp  # here, not at the top: this module imports only NumPy
    ops = xp.asarray(batch[FLIP_ROTATE]).astype(np.int32)
    turns, flip = ops[:, 0] % 4, ops[:, 1] != 0
    transpose = turns % 2 == 1  # turn 90 = flip columns, then transpose; 270 = flip rows, then transpose
    flip_rows = (turns >= 2) ^ (flip & transpose)  # a final left-right flip after a transpose is a row flip
    flip_cols = ((turns == 1) | (turns == 2)) ^ (flip & ~transpose)  # before it
    out = {k: v for k, v in batch.items() if k != FLIP_ROTATE}
    for key in (k for k in ARRAY_KEYS if k in out):
        x = out[key]
        rows, cols = x.ndim - 3, x.ndim - 2
        per_sample = (-1,) + (1,) * (x.ndim - 1)  # a (B,) mask broadcast over the sample's axes
        x = xp.where(flip_rows.reshape(per_sample), xp.flip(x, rows), x)
        x = xp.where(flip_cols.reshape(per_sample), xp.flip(x, cols), x)
        if x.shape[rows] == x.shape[cols]:
            x = xp.where(transpose.reshape(per_sample), xp.swapaxes(x, rows, cols), x)
        elif xp is np and transpose.any():
            size = f"{x.shape[rows]}x{x.shape[cols]}"
            raise ValueError(f"batch[{key!r}] is {size}: odd turns need square images")
        out[key] = x
    return out


# ------------------------------------------------------------------------------------------------------ bands


def resolve_bands(spec: None | str | Sequence[int | str] = None) -> tuple[int, ...]:
    """A band spec, in any of its forms -> 0-based indices into `S2_BANDS`, in the spec's order.

    The one parser of band specs (configs, CLIs, bundles and readers all call it):

      None, "" or "all"   all 13, file order
      "rgb"               `RGB` (B04, B03, B02)
      "B02,B03", "3,2,1"  a comma-separated string of band names and/or indices
      ["B04", "b8a", 0]   a sequence of names and/or integer indices (0..12)

    Case and spaces do not matter. Duplicates, unknown names and out-of-range indices raise ValueError.
    """
    if spec is None:
        return tuple(range(len(S2_BANDS)))
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in ("", "all"):
            return tuple(range(len(S2_BANDS)))
        if key == "rgb":
            return RGB
        spec = [b for b in spec.split(",") if b.strip()]
    if not isinstance(spec, Iterable):
        raise ValueError(f"bands must be None, 'rgb', 'all', or a sequence of names/indices; got {spec!r}")
    out: list[int] = []
    for band in spec:
        index = _band_index(band)
        if index in out:
            raise ValueError(f"band {S2_BANDS[index]} (index {index}) selected twice in {list(spec)!r}")
        out.append(index)
    if not out:
        raise ValueError("empty band selection")
    return tuple(out)


def _band_index(band: Any) -> int:
    if isinstance(band, str) and band.strip().isdigit():
        band = int(band)
    if isinstance(band, str):
        name = band.strip().upper()
        if name not in S2_BANDS:
            raise ValueError(f"unknown Sentinel-2 band {band!r}; valid names: {', '.join(S2_BANDS)}")
        return S2_BANDS.index(name)
    if isinstance(band, (int, np.integer)) and not isinstance(band, (bool, np.bool_)):
        if not 0 <= band < len(S2_BANDS):
            raise ValueError(f"band index {band} out of range [0, {len(S2_BANDS) - 1}]")
        return int(band)
    raise ValueError(f"band {band!r} is neither a band name nor an integer index")


def rgb_channels(spec: None | str | Sequence[int | str] = None) -> tuple[int, int, int]:
    """The channels of B04, B03, B02 in images of a band selection (any `resolve_bands` spec), for true-colour
    views; (0, 0, 0), a grey view of the first band, when the selection lacks one of them."""
    bands = resolve_bands(spec)
    if not all(b in bands for b in RGB):
        return (0, 0, 0)
    return tuple(bands.index(b) for b in RGB)


# --------------------------------------------------------------------------------------------------- GeoTIFFs

# Open files inside `rasterio.Env(**GDAL_ENV)`:
# - GDAL_DISABLE_READDIR_ON_OPEN: otherwise GDAL lists each file's folder (thousands of patches in SEN12MS-CR)
#   on every open, looking for sidecar files;
# - GTIFF_VIRTUAL_MEM_IO: an uncompressed local GeoTIFF (the SEN12MS-CR patches) is read through a memory map
#   straight into the destination array, not strip by strip through GDAL's block cache: 2-4x faster reads of
#   a patch (BENCHMARKS.md, Data pipeline). Compressed or remote files take GDAL's usual path, and a file
#   shorter than its strips says is still a read error (tests/test_sen12mscr.py), not zeros;
# - GTIFF_SRS_SOURCE=GEOKEYS: the CRS is built from the file's GeoKeys alone. By default GDAL also builds the
#   EPSG definition of the file's code and compares the two, which took over half of every open (rasterio
#   reads the CRS of each file it opens, 4 files a patch): a patch reads about 25 % faster (BENCHMARKS.md,
#   Data pipeline). Files whose keys agree with their EPSG code, as the SEN12MS-CR patches and every file
#   GDAL writes, get the same CRS: identical for projected ones, and for geographic ones a WKT without the
#   EPSG authority nodes that compares equal and is written back as the code (tests/test_contract.py). For
#   keys that contradict their code the CRS is what the keys say, without the code (GDAL's default warns).
GDAL_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GTIFF_VIRTUAL_MEM_IO": "YES",
            "GTIFF_SRS_SOURCE": "GEOKEYS"}

# How far (in pixels) partner files may place the same point and still count as one grid. See check_same_grid.
GRID_TOLERANCE = 1e-3


class DataError(ValueError):
    """A data file is missing, unreadable or invalid. ``str(err)`` starts with the file path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument constructor
        return (type(self), (self.path, self.reason))


def open_geotiff(
    path: str | os.PathLike,
    stack: ExitStack,
    what: str,
    *,
    count: int,
    dtypes: Sequence[str],
    grid_of: tuple[Any, str | os.PathLike] | None = None,
):
    """Opens the GeoTIFF at `path` into `stack` and checks it; the open rasterio dataset.

    Args:
      path: the file; stack: an ExitStack that closes it (call inside ``rasterio.Env(**GDAL_ENV)``).
      what: the file's role in messages, e.g. "Sentinel-1".
      count: the band count it must have; dtypes: the dtypes it may have (the same for every band).
      grid_of: (dataset, path) of an open partner it must share a grid with (`check_same_grid`).
    Raises DataError naming `path`: missing, not a readable GeoTIFF, wrong band count or dtype, off the grid.
    """
    import rasterio  # here, not at the top: the networks import this module and need no GDAL

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file does not exist")
    try:
        ds = stack.enter_context(rasterio.open(path))
    except rasterio.errors.RasterioError as e:
        raise DataError(path, f"cannot open {what} as a GeoTIFF ({e})") from e
    if ds.count != count:
        raise DataError(path, f"{what} must have {count} band{'s' if count != 1 else ''}, found {ds.count}")
    if len(set(ds.dtypes)) != 1 or ds.dtypes[0] not in dtypes:
        found = ", ".join(sorted(set(ds.dtypes)))
        raise DataError(path, f"{what} must be {' or '.join(dtypes)}, found {found}")
    if grid_of is not None:
        check_same_grid(ds, path, *grid_of)
    return ds


def check_same_grid(ds, path: str | os.PathLike, ref, ref_path: str | os.PathLike) -> None:
    """DataError naming `path` unless the dataset `ds` lies on the pixel grid of the dataset `ref`.

    Same grid: the same size, the same CRS (a file without one is taken to share its partner's), and
    transforms that place every point of the raster within `GRID_TOLERANCE` (a thousandth) of a pixel of
    each other.

    Why a thousandth of a pixel: the readers pair partner pixels by index and never resample, so any real
    offset is a misregistration that training would learn and prediction reproduce; half a pixel, the rule
    the dataset reader once had, let 5 m shifts of 10 m pixels through. Co-registered files, like the
    SEN12MS-CR partners, have identical transforms; the tolerance only forgives the float round-off of
    transforms written by different tools (1 cm at 10 m; float64 round-off is a billion times smaller).
    """
    problem = None
    if (ds.height, ds.width) != (ref.height, ref.width):
        problem = f"size {ds.height}x{ds.width} vs {ref.height}x{ref.width}"
    elif ds.crs and ref.crs and ds.crs != ref.crs:
        problem = f"CRS {ds.crs} vs {ref.crs}"
    elif ds.transform != ref.transform:  # identical transforms (co-registered partners): nothing to measure
        offset = _grid_offset(ds.transform, ref.transform, ds.height, ds.width)
        if offset > GRID_TOLERANCE:
            problem = (f"transform {tuple(ds.transform)[:6]} vs {tuple(ref.transform)[:6]} "
                       f"({offset:.3g} pixels apart)")
    if problem:
        raise DataError(path, f"not on the grid of {ref_path}: {problem}; resample it onto that grid first")


def _grid_offset(transform, ref_transform, height: int, width: int) -> float:
    """The largest distance, in pixels of `ref_transform`, between where the two affine transforms place a
    point of a height x width raster: the difference of the two maps at the farthest corner."""
    difference = np.reshape(tuple(transform)[:6], (2, 3)) - np.reshape(tuple(ref_transform)[:6], (2, 3))
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], np.float64)
    pixel = max(math.sqrt(abs(ref_transform.determinant)), 1e-12)
    return float(np.linalg.norm(corners @ difference.T, axis=1).max()) / pixel
