"""Sentinel-2 inputs as users have them, read onto one 10 m grid in the model's digital numbers.

`open_s2(path)` accepts:

  stacked   one raster file (GeoTIFF/COG/JP2) holding the bands: 13 bands in SEN12MS-CR order (B01..B08, B8A,
            B09..B12, `contract.S2_BANDS`), or any set of bands when every band description names a band
            (e.g. the 12 of an L2A product, without B10), read by name; uint16 DN or float (DN or reflectance).
  bands     a folder of one file per band (GeoTIFF/COG/JP2), each named by its band: `B02.tif`,
            `T31UFQ_20230601T103631_B02_10m.jp2`, `scene_B8A.tif` (a `B0?<n>A?` token between separators);
            files without such a token (TCI, SCL, AOT, ...) are ignored, two files for one band are an error.
  safe      a Sentinel-2 product, a `*.SAFE` folder or a `.zip` of one (read through GDAL's /vsizip/): L1C band
            files `GRANULE/*/IMG_DATA/*_B02.jp2`, L2A ones `GRANULE/*/IMG_DATA/R10m/*_B02_10m.jp2` (R20m, R60m),
            each band taken at its native resolution; the level, processing baseline, offsets and
            quantification come from `MTD_MSIL1C.xml` / `MTD_MSIL2A.xml`, parsed with `xml.etree`.
            Band files may be GeoTIFFs (.tif) inside the SAFE layout as well as JP2.

The grid: that of B02 (or, without B02, of the finest band). Bands on another grid of the same CRS (the 20 m
and 60 m bands) are resampled onto it with `rasterio.vrt.WarpedVRT`, window by window as rows are read (a
10980 x 10980 band is never read whole), **bilinearly** by default, in float32 (no rounding to integers); rows
far from any nodata take the warper's plain kernel, the others its nodata-aware one (`_Resampled`).
Bilinear, not cubic: it cannot overshoot (no negative or ringing values at cloud edges) and respects nodata.
Note: SEN12MS-CR was exported from Google Earth Engine, whose default resampling is nearest neighbour, so its
20/60 m bands are blocky at 10 m; ``resampling="nearest"`` reproduces that look if a model proves sensitive.
Bands of different CRS are refused (reproject them first).

Digital numbers: what `S2Scene.read` returns is ``(DN - offset) * 10000 / quantification``, clipped at 0, the
scale of the L1C data the models were trained on (SEN12MS-CR predates offsets: reflectance x 10000).
  offset  ESA adds 1000 DN to every band from processing baseline 04.00 (January 2022) on: reflectance =
          (DN + RADIO_ADD_OFFSET) / QUANTIFICATION_VALUE with RADIO_ADD_OFFSET (L2A: BOA_ADD_OFFSET) = -1000.
          It is read from the product metadata (per band; the offset list, or 1000 for baselines >= 04.00 that
          lack one); ``offset=`` overrides it for every band (a stacked file or band folder has no metadata:
          the CLI's --s2-offset). Without metadata or argument it is 0.
  units   uint16 files hold DN. Float files hold DN or reflectance: `detect_units` samples a few windows and
          takes values within [0, 2] for reflectance, multiplied by 10000 with a warning naming the file;
          ``units="dn"`` or ``"reflectance"`` forces either.
Values that are NaN or Inf (other than nodata) raise DataError naming the file; negative values or values above
30000 DN are reported once per band with a warning naming the file and band.

L2A products have no B10 (the cirrus band): `bands` lacks it and reading it raises DataError, unless
``fill_b10=True`` (B10 read as the constant `B10_FILL_DN`) or a number (that DN). The models are trained on L1C
(top of atmosphere); `warn_level_mismatch` says so when an input is L2A (bottom of atmosphere).
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Self
from xml.etree import ElementTree

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from crrf_jax.data import contract
from crrf_jax.data.contract import DataError

log = logging.getLogger(__name__)

KINDS = ("stacked", "bands", "safe")
LEVELS = ("L1C", "L2A")
UNITS = ("auto", "dn", "reflectance")
# Native pixel size (m) of each band; L2A products also carry coarser copies (R20m/R60m), the native one is read.
NATIVE_RESOLUTION = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
                     "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20}
L2A_BANDS = tuple(b for b in contract.S2_BANDS if b != "B10")
# B10 (1375 nm cirrus band) for products without it (L2A), in DN = reflectance x 10000. Over clear land B10 sees
# almost nothing through the water vapour above ~2 km (TOA reflectance ~0.001-0.005, 10-50 DN; cf. the clear
# spectra of crrf_jax.data.synthetic) while thin cirrus shows hundreds of DN. 50 DN is the upper end of clear
# sky: it neither fakes cirrus nor claims a perfectly transparent atmosphere. It removes the model's cirrus cue,
# so prefer a model trained without B10 where one exists.
B10_FILL_DN = 50.0
REFLECTANCE_MAX = 2.0  # float inputs with every sampled value in [0, REFLECTANCE_MAX] are reflectance (auto)
DN_WARN_MAX = 30000.0  # DN above this (after the units' scaling) are reported
OFFSET_BASELINE = (4, 0)  # processing baseline from which ESA adds 1000 DN
DEFAULT_OFFSET_DN = 1000.0
OFFSET_SINCE = "20220125"  # baseline 04.00 went into operation on 25 January 2022
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")
RESAMPLING = {"bilinear": Resampling.bilinear, "cubic": Resampling.cubic, "nearest": Resampling.nearest}
UNITS_SAMPLE_WINDOWS = 5  # windows per band `detect_units` reads
UNITS_SAMPLE_SIZE = 256  # their side in pixels

_BAND_TOKEN = re.compile(r"(?<![A-Za-z0-9])B0?(\d{1,2})(A?)(?![A-Za-z0-9])", re.IGNORECASE)
_RESOLUTION_TOKEN = re.compile(r"(?:^|[_\-./])R?(10|20|60)m(?=$|[_\-./])", re.IGNORECASE)
_ESA_DATE = re.compile(r"T\d{2}[A-Z]{3}_(\d{8})T\d{6}_B", re.IGNORECASE)


def band_name(text: str | None) -> str | None:
    """'B1', 'b01', 'B8a', 'B08A' -> 'B01', 'B01', 'B8A', 'B8A'; None when `text` is not a band name."""
    m = re.fullmatch(r"B0?(\d{1,2})(A?)", (text or "").strip(), re.IGNORECASE)
    return _canonical(m) if m else None


def _canonical(m: re.Match) -> str | None:
    number, a = int(m.group(1)), m.group(2).upper()
    if a and number != 8 or not 1 <= number <= 12:
        return None
    return "B8A" if a else f"B{number:02d}"


def band_in_filename(path: str | os.PathLike) -> str | None:
    """The band a file is named after ('T31UFQ_20230601T103631_B02_10m.jp2' -> 'B02'), None when its name has
    no band token; DataError when it has several different ones."""
    stem = PurePosixPath(str(path)).name.rsplit(".", 1)[0]
    found = {b for b in (_canonical(m) for m in _BAND_TOKEN.finditer(stem)) if b}
    if len(found) > 1:
        raise DataError(path, f"the file name names several bands ({', '.join(sorted(found))}); rename it")
    return found.pop() if found else None


# ------------------------------------------------------------------------------------------------------------
# The scene
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """Where one band is read: `reader` (the open dataset or a `_Resampled` onto the grid), band `index`."""

    path: str  # the file, for messages (a /vsizip/ path inside a zip)
    reader: Any  # .read(indexes, window=, out_dtype=) like a rasterio dataset
    index: int = 1
    on_grid: bool = True  # read directly, without resampling


class _Resampled:
    """A band file read onto another grid through GDAL's warper (`WarpedVRT`), a window at a time.

    With a nodata value the warper runs its nodata-aware kernel, which leaves nodata pixels out of each output
    pixel's neighbourhood; that kernel costs about 3x the plain one (BENCHMARKS.md, Scene prediction: 1.16
    vs 0.42 CPU s for a 20 m band of a 4096² scene), and the two give identical values wherever the
    neighbourhood holds no nodata. So each window's source rows (with `MARGIN` rows beyond the ones its pixel
    centres fall between, more than any kernel reaches) are checked first, and the rows without nodata are
    warped by the plain kernel: all of them in a product without empty areas. The plain warp is used only for
    north-up grids whose extent the file covers (no output pixel beyond it), so the choice never changes a
    value (tests/test_scene_s2.py)."""

    MARGIN = 4  # source rows; bilinear reaches 1 beyond the centres, cubic 2

    def __init__(self, ds, grid, resampling, nodata: float | None, stack: ExitStack):
        common = dict(crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                      resampling=resampling, dtype="float32")
        self.src_dataset, self._nodata = ds, nodata
        self._masked = stack.enter_context(WarpedVRT(ds, src_nodata=nodata,
                                                     nodata=nodata if nodata is not None else 0, **common))
        st, gt = ds.transform, grid.transform
        plain = (nodata is not None and st.b == st.d == gt.b == gt.d == 0 and st.e < 0 and gt.e < 0
                 and _contains(ds.bounds, grid.bounds))
        self._plain = stack.enter_context(WarpedVRT(ds, src_nodata=None, **common)) if plain else None
        self._rows = lambda y: (gt.f + y * gt.e - st.f) / st.e  # grid row edge -> source row coordinate

    def read(self, indexes, window: Window, out_dtype: str) -> np.ndarray:
        vrt = self._masked if self._plain is None or self._has_nodata(window) else self._plain
        return vrt.read(indexes, window=window, out_dtype=out_dtype)

    def _has_nodata(self, window: Window) -> bool:
        ds = self.src_dataset
        top, bottom = self._rows(window.row_off), self._rows(window.row_off + window.height)
        r0 = max(0, math.floor(top) - self.MARGIN)
        r1 = min(ds.height, math.ceil(bottom) + self.MARGIN)
        rows = ds.read(1, window=Window(0, r0, ds.width, r1 - r0))
        return bool(np.isnan(rows).any() if math.isnan(self._nodata) else (rows == self._nodata).any())


def _contains(outer, inner) -> bool:
    """Whether bounds `outer` contain bounds `inner` (left, bottom, right, top)."""
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


class S2Scene:
    """An opened Sentinel-2 input on its 10 m grid (see the module docstring); a context manager that closes its
    files. Build it with `open_s2`."""

    def __init__(self, path, kind: str, level: str | None, grid, sources: dict[str, _Source], stack: ExitStack,
                 *, offsets: dict[str, float], nodata: float | None, scale: float = 1.0, gain: float = 1.0,
                 fill_b10: float | None = None):
        self.path, self.kind, self.level = str(path), kind, level
        self.crs, self.transform, self.width, self.height = grid.crs, grid.transform, grid.width, grid.height
        self._sources, self._stack, self._offsets = sources, stack, offsets
        self._scale, self._gain, self._file_nodata, self._fill_b10 = scale, gain, nodata, fill_b10
        names = [b for b in contract.S2_BANDS if b in sources or (b == "B10" and fill_b10 is not None)]
        self.bands: tuple[str, ...] = tuple(names)
        values = [offsets.get(b, 0.0) for b in sources]
        self.offset: float = max(set(values), key=values.count) if values else 0.0  # the common offset
        self.nodata: float | None = None if nodata is None else float(nodata) * scale
        self._cache: tuple[tuple[int, int], dict[str, np.ndarray]] = ((0, 0), {})
        # A product's band files are read side by side, each dataset by one thread at a time (`_raw`).
        self._pool: ThreadPoolExecutor | None = None
        self._reported: set[str] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cache = ((0, 0), {})
        self._stack.close()

    def __repr__(self) -> str:
        return (f"S2Scene({self.path!r}, kind={self.kind}, level={self.level}, {self.height}x{self.width}, "
                f"bands={','.join(self.bands)}, offset={self.offset:g})")

    def source_path(self, band: str) -> str:
        """The file band `band` is read from."""
        return self._sources[band].path

    def read(self, y0: int, y1: int, bands: Sequence[str]) -> np.ndarray:
        """Rows [y0, y1) of the 10 m grid, full width: (y1 - y0, width, len(bands)) float32 DN with the offset
        removed (DN - offset, x 10000 / quantification, clipped at 0), bands in the order asked. Samples equal
        to the nodata value read as 0 (`valid` tells which pixels they are). Raises DataError naming the file."""
        names = [self._band(b) for b in bands]
        raw = self._raw(y0, y1, [b for b in names if b in self._sources])
        out = np.empty((y1 - y0, self.width, len(names)), np.float32)
        for i, name in enumerate(names):
            if name not in self._sources:
                out[..., i] = self._fill_b10
                continue
            values = raw[name]
            empty = None if self._file_nodata is None else self._is_nodata(values)
            bad = ~np.isfinite(values)
            if empty is not None:
                bad &= ~empty
            if bad.any():
                raise DataError(self._sources[name].path,
                                f"{int(bad.sum())} NaN or Inf values in band {name}, rows {y0}..{y1}")
            dn = values * np.float32(self._scale)  # float32 throughout, in place after this copy
            self._report_range(name, dn if empty is None else dn[~empty], y0, y1)
            dn -= np.float32(self._offsets.get(name, 0.0))
            dn *= np.float32(self._gain)
            np.maximum(dn, 0.0, out=dn)
            if empty is not None:
                dn[empty] = 0.0
            out[..., i] = dn
        return out

    def valid(self, y0: int, y1: int) -> np.ndarray:
        """(y1 - y0, width) bool: the pixels that are not nodata, i.e. not nodata in every band read on the grid
        directly (all bands of a stacked file; the 10 m bands of a product or band folder)."""
        if self._file_nodata is None:
            return np.ones((y1 - y0, self.width), bool)
        names = [b for b, s in self._sources.items() if s.on_grid]
        raw = self._raw(y0, y1, names)
        return ~np.all([self._is_nodata(raw[b]) for b in names], axis=0)

    def _band(self, band: str) -> str:
        name = band_name(band)
        if name is None:
            raise ValueError(f"unknown Sentinel-2 band {band!r}; valid names: {', '.join(contract.S2_BANDS)}")
        if name in self._sources or (name == "B10" and self._fill_b10 is not None):
            return name
        if name == "B10":
            what = "an L2A product" if self.level == "L2A" else "an input"
            raise DataError(self.path, f"is {what} without B10 (the cirrus band; L2A products drop it): use a "
                                       "model trained on a band subset without B10, or --fill-b10 "
                                       f"(fill_b10=True: B10 read as {B10_FILL_DN:g} DN)")
        raise DataError(self.path, f"has no band {name} (it has {', '.join(self.bands)})")

    def _is_nodata(self, values: np.ndarray) -> np.ndarray:
        if self._file_nodata is None:
            return np.zeros(values.shape, bool)
        if math.isnan(self._file_nodata):
            return np.isnan(values)
        return values == np.float32(self._file_nodata)

    def _raw(self, y0: int, y1: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Bands `names`, rows [y0, y1), as float32 in the file's units; the last window read is cached (`read`
        and `valid` of the same rows decode each file once)."""
        if not 0 <= y0 < y1 <= self.height:
            raise ValueError(f"rows {y0}..{y1} outside the scene's 0..{self.height}")
        key, cached = self._cache
        if key != (y0, y1):
            cached = {}
            self._cache = ((y0, y1), cached)
        by_reader: dict[int, list[str]] = {}
        for name in names:
            if name not in cached:
                by_reader.setdefault(id(self._sources[name].reader), []).append(name)
        window = Window(0, y0, self.width, y1 - y0)

        def read(group: list[str]) -> list[tuple[str, np.ndarray]]:
            source = self._sources[group[0]]
            try:
                data = source.reader.read([self._sources[b].index for b in group], window=window,
                                          out_dtype="float32")
            except rasterio.errors.RasterioError as e:
                raise DataError(source.path, f"cannot read rows {y0}..{y1} (truncated or corrupt file?) "
                                             f"({e})") from e
            return list(zip(group, data))

        groups = list(by_reader.values())
        if len(groups) > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(min(len(self._sources), os.cpu_count() or 1),
                                            thread_name_prefix="read_s2_files")
            self._stack.callback(self._pool.shutdown, cancel_futures=True)
        for pairs in (self._pool.map(read, groups) if len(groups) > 1 else map(read, groups)):
            cached.update(pairs)
        return {b: cached[b] for b in names}

    def _report_range(self, name: str, dn: np.ndarray, y0: int, y1: int) -> None:
        if name in self._reported or not dn.size:
            return
        low, high = float(dn.min()), float(dn.max())
        if low < 0 or high > DN_WARN_MAX:
            self._reported.add(name)
            log.warning("%s: band %s has values from %g to %g DN in rows %d..%d (expected 0..%g; negative "
                        "values are clipped to 0, the model sees at most 10000)", self._sources[name].path, name,
                        low, high, y0, y1, DN_WARN_MAX)


def warn_level_mismatch(scene: S2Scene, trained_level: str | None) -> None:
    """Logs a warning when the scene's processing level (L1C/L2A) differs from the model's training data (L1C
    for SEN12MS-CR models), and an info line when the scene's level is unknown."""
    trained = _level(trained_level)
    if trained is None:
        return
    if scene.level is None:
        log.info("%s: processing level unknown (no product metadata); the model was trained on %s",
                 scene.path, trained)
    elif scene.level != trained:
        log.warning("%s: %s input but the model was trained on %s: %s; expect biased colours and "
                    "less reliable cloud removal", scene.path, scene.level, trained,
                    "L1C is top-of-atmosphere, L2A bottom-of-atmosphere (atmospherically corrected) reflectance")


def _level(text: str | None) -> str | None:
    """'L1C', 'Level-1C', 'MSIL1C', 'l2a' -> 'L1C' / 'L2A'; None otherwise."""
    m = re.search(r"(?:L|LEVEL-?|MSIL)(1C|2A)", (text or "").upper())
    return f"L{m.group(1)}" if m else None


# ------------------------------------------------------------------------------------------------------------
# Opening
# ------------------------------------------------------------------------------------------------------------


def open_s2(path: str | os.PathLike, *, offset: float | None = None, fill_b10: bool | float = False,
            units: str = "auto", resampling: str = "bilinear") -> S2Scene:
    """Opens a Sentinel-2 input (a stacked raster, a folder of band files, a .SAFE folder or its .zip; see the
    module docstring) on its 10 m grid.

    Args:
      offset: DN subtracted from every band (overrides the product metadata; default: the metadata's, else 0).
      fill_b10: make B10 available when the input lacks it: True reads it as `B10_FILL_DN`, a number as that DN.
      units: "auto" (float files with values in [0, 2] are reflectance, x 10000, with a warning), "dn" or
        "reflectance" (forced).
      resampling: how bands on a coarser grid come onto the 10 m one: "bilinear" (default), "cubic", "nearest".
    Raises DataError naming the file for inputs that are missing, unreadable, ambiguous or inconsistent.
    """
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}; got {units!r}")
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {', '.join(RESAMPLING)}; got {resampling!r}")
    fill = None if fill_b10 is False or fill_b10 is None else B10_FILL_DN if fill_b10 is True else float(fill_b10)
    path = Path(path)
    if path.is_file() and re.fullmatch(r"MTD_MSIL(1C|2A)\.xml", path.name, re.IGNORECASE):
        path = path.parent
    if not path.exists():
        raise DataError(path, "Sentinel-2 input does not exist")
    stack = ExitStack()
    try:
        with rasterio.Env(**contract.GDAL_ENV):
            if path.is_dir() or path.suffix.lower() == ".zip":
                product = _Product.open(path)
                kind = "safe" if product.is_safe else "bands"
                if kind == "bands" and path.suffix.lower() == ".zip":
                    raise DataError(path, "zip holds no Sentinel-2 product (no *.SAFE with MTD_MSIL*.xml)")
                meta = product.metadata(offset)
                files = product.band_files() if kind == "safe" else _folder_band_files(path)
                nodata = 0.0 if kind == "safe" else None
                grid, sources, nodata = _open_band_files(files, stack, nodata, RESAMPLING[resampling])
                level = meta.level or _level_from_names([path.name, *files.values()], sources)
            else:
                kind, meta = "stacked", _Metadata()
                grid, sources, nodata, level = _open_stacked(path, stack)
            if kind == "safe":
                _check_complete(path, level, sources)
            offsets = _offsets(path, kind, meta, offset, sources)
            scale = _units_scale(path, sources, nodata, units)
            scene = S2Scene(path, kind, level, grid, sources, stack, offsets=offsets, nodata=nodata,
                            scale=scale, gain=meta.gain, fill_b10=fill)
    except BaseException:
        stack.close()
        raise
    return scene


@dataclass
class _Metadata:
    """What a product's MTD_MSIL*.xml says (all None without one)."""

    level: str | None = None
    baseline: tuple[int, int] | None = None
    offsets: dict[str, float] | None = None  # DN subtracted, per band (-RADIO_ADD_OFFSET / -BOA_ADD_OFFSET)
    quantification: float | None = None

    @property
    def gain(self) -> float:
        return contract.S2_DN_MAX / self.quantification if self.quantification else 1.0


def _offsets(path: Path, kind: str, meta: _Metadata, offset: float | None, sources) -> dict[str, float]:
    """DN to subtract per band: the argument, else the metadata's, else 0 (with a warning where ESA's file
    names show a product from the baseline-04.00 era)."""
    if offset is not None:
        return {b: float(offset) for b in sources}
    if meta.offsets is not None:
        return {b: meta.offsets.get(b, 0.0) for b in sources}
    if meta.baseline is not None:
        value = DEFAULT_OFFSET_DN if meta.baseline >= OFFSET_BASELINE else 0.0
        return {b: value for b in sources}
    dates = [m.group(1) for s in sources.values() if (m := _ESA_DATE.search(PurePosixPath(s.path).name))]
    if dates and max(dates) >= OFFSET_SINCE:
        log.warning("%s: no product metadata, so no DN offset is subtracted; ESA products sensed or processed "
                    "since %s-%s-%s (baseline >= 04.00) carry +%g DN: pass offset=%g (--s2-offset %g) if this "
                    "one does", path, OFFSET_SINCE[:4], OFFSET_SINCE[4:6], OFFSET_SINCE[6:], DEFAULT_OFFSET_DN,
                    DEFAULT_OFFSET_DN, DEFAULT_OFFSET_DN)
    return {b: 0.0 for b in sources}


def _check_complete(path: Path, level: str | None, sources) -> None:
    expected = L2A_BANDS if level == "L2A" else contract.S2_BANDS
    missing = [b for b in expected if b not in sources]
    if missing:
        raise DataError(path, f"{level or 'Sentinel-2'} product without band file(s) for {', '.join(missing)} "
                              "under GRANULE/*/IMG_DATA")


def _level_from_names(names, sources) -> str | None:
    """A folder's level from its or its files' names (MSIL1C / L2A tokens), or 'L2A' for L2A-style band file
    names (`_10m` resolution suffixes); None when nothing tells."""
    for name in map(str, names):
        if level := _level(PurePosixPath(name).name):
            return level
    if any(_RESOLUTION_TOKEN.search(PurePosixPath(s.path).name) for s in sources.values()):
        return "L2A"
    return None


# ------------------------------------------------------------------------------------------------- stacked


def _open_stacked(path: Path, stack: ExitStack):
    """(grid dataset, sources, nodata, level) of a stacked raster file."""
    ds = _open_raster(str(path), stack)
    if len(set(ds.dtypes)) != 1 or ds.dtypes[0] not in contract.S2_DTYPES:
        raise DataError(path, f"Sentinel-2 bands must be {' or '.join(contract.S2_DTYPES)}, found "
                              f"{', '.join(sorted(set(ds.dtypes)))}")
    names = [band_name(d) for d in ds.descriptions]
    if all(names):
        if len(set(names)) != len(names):
            raise DataError(path, f"band descriptions name a band twice: {', '.join(names)}")
    elif ds.count == len(contract.S2_BANDS):
        names = list(contract.S2_BANDS)  # SEN12MS-CR order, as the training data
    else:
        raise DataError(path, f"has {ds.count} bands without band names in their descriptions: expected the 13 "
                              f"bands in SEN12MS-CR order ({', '.join(contract.S2_BANDS)}), or every band "
                              "described by its name (e.g. the 12 of an L2A product)")
    sources = {name: _Source(str(path), ds, i) for i, name in enumerate(names, start=1)}
    level = _level(path.name) or _level(" ".join(str(v) for k, v in ds.tags().items() if "LEVEL" in k.upper()))
    return ds, sources, ds.nodata, level


def _open_raster(path: str, stack: ExitStack):
    try:
        return stack.enter_context(rasterio.open(path))
    except rasterio.errors.RasterioError as e:
        raise DataError(path, f"cannot open the Sentinel-2 raster ({e})") from e


# ---------------------------------------------------------------------------------------------- band files


def _folder_band_files(folder: Path) -> dict[str, str]:
    """band -> file of a folder of per-band rasters; DataError for two files of one band or none at all."""
    files: dict[str, str] = {}
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.suffix.lower() not in RASTER_SUFFIXES:
            continue
        band = band_in_filename(file)
        if band is None:
            continue
        if band in files:
            raise DataError(file, f"second file for band {band} (the other is {files[band]}); keep one")
        files[band] = str(file)
    if not files:
        raise DataError(folder, f"no Sentinel-2 band files: expected rasters ({', '.join(RASTER_SUFFIXES)}) "
                                "named by band, e.g. B02.tif or T31UFQ_20230601T103631_B02_10m.jp2")
    return {b: files[b] for b in contract.S2_BANDS if b in files}


def _open_band_files(files: dict[str, str], stack: ExitStack, nodata: float | None, resampling):
    """(grid, sources, nodata) of one file per band: the grid of B02 (else the finest band); bands on another
    grid are read through `_Resampled` onto it. `nodata` overrides the files' own (0 for SAFE products)."""
    datasets = {b: _open_raster(p, stack) for b, p in files.items()}
    for band, ds in datasets.items():
        if ds.count != 1:
            raise DataError(files[band], f"band file for {band} must have 1 band, found {ds.count}")
        if ds.dtypes[0] not in contract.S2_DTYPES:
            raise DataError(files[band], f"band {band} must be {' or '.join(contract.S2_DTYPES)}, found "
                                         f"{ds.dtypes[0]}")
    ref_band = "B02" if "B02" in datasets else min(datasets, key=lambda b: abs(datasets[b].res[0]))
    grid, ref_path = datasets[ref_band], files[ref_band]
    if nodata is None:
        values = {ds.nodata for ds in datasets.values()}
        nodata = grid.nodata if len(values) == 1 else _mixed_nodata(files, datasets)
    sources = {}
    for band, ds in datasets.items():
        if _on_grid(ds, grid):
            sources[band] = _Source(files[band], ds)
            continue
        _check_warpable(ds, files[band], grid, ref_path)
        sources[band] = _Source(files[band], _Resampled(ds, grid, resampling, nodata, stack), on_grid=False)
    return grid, sources, nodata


def _mixed_nodata(files, datasets):
    found = ", ".join(f"{b}: {ds.nodata}" for b, ds in datasets.items())
    raise DataError(next(iter(files.values())), f"band files disagree on their nodata value ({found})")


def _on_grid(ds, grid) -> bool:
    """Whether `ds` lies on the grid (`contract.check_same_grid`'s rule), so it is read without resampling."""
    try:
        contract.check_same_grid(ds, "", grid, "")
    except DataError:
        return False
    return True


def _check_warpable(ds, path: str, grid, ref_path: str) -> None:
    """A band to resample onto the grid must share its CRS and cover its extent (to one of its own pixels)."""
    if ds.crs is None or grid.crs is None:
        raise DataError(path if ds.crs is None else ref_path, "has no CRS, so it cannot be resampled onto the "
                                                              "grid of the other bands")
    if ds.crs != grid.crs:
        raise DataError(path, f"CRS {ds.crs} differs from {grid.crs} of {ref_path}; reproject it first")
    pixel = max(abs(ds.res[0]), abs(ds.res[1]))
    if max(abs(a - b) for a, b in zip(ds.bounds, grid.bounds)) > pixel:
        raise DataError(path, f"covers {tuple(ds.bounds)}, not the extent {tuple(grid.bounds)} of {ref_path}")


# ------------------------------------------------------------------------------------------------- products


class _Product:
    """The files of a folder or a zip: a SAFE product (MTD_MSIL*.xml and GRANULE/*/IMG_DATA) or not."""

    def __init__(self, path: Path, names: list[str], prefix: str, zipped: bool):
        self.path, self.names, self.prefix, self.zipped = path, names, prefix, zipped
        self.mtd = next((n for n in names if re.fullmatch(r"MTD_MSIL(1C|2A)\.xml", n, re.IGNORECASE)), None)
        self.is_safe = path.name.upper().endswith(".SAFE") or any(n.startswith("GRANULE/") for n in names)

    @classmethod
    def open(cls, path: Path) -> _Product:
        """The listing of a folder (recursive, relative posix names) or of the one .SAFE in a zip."""
        if path.is_dir():
            return cls(path, sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()), "",
                       zipped=False)
        try:
            with zipfile.ZipFile(path) as z:
                members = [n for n in z.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(path, f"cannot read the zip ({e})") from e
        roots = sorted({m.group(1) for n in members
                        if (m := re.fullmatch(r"(.*?)/?(?:MTD_MSIL(?:1C|2A)\.xml|GRANULE/.*)", n, re.IGNORECASE))})
        if len(roots) > 1:
            raise DataError(path, f"zip holds several products ({', '.join(roots)}); give one")
        prefix = roots[0] + "/" if roots and roots[0] else ""
        names = [n[len(prefix):] for n in members if n.startswith(prefix)]
        return cls(path, names, prefix, zipped=True)

    def raster_path(self, name: str) -> str:
        """What rasterio opens for member `name`: the file, or /vsizip/<zip>/<member>."""
        if self.zipped:
            return f"/vsizip/{self.path.resolve().as_posix()}/{self.prefix}{name}"
        return str(self.path / name)

    def read_bytes(self, name: str) -> bytes:
        if not self.zipped:
            return (self.path / name).read_bytes()
        with zipfile.ZipFile(self.path) as z:
            return z.read(self.prefix + name)

    def metadata(self, offset: float | None) -> _Metadata:
        """The product metadata; DataError for a SAFE product without it unless `offset` is given."""
        if self.mtd is None:
            if self.is_safe and offset is None:
                raise DataError(self.path, "Sentinel-2 product without MTD_MSIL1C.xml / MTD_MSIL2A.xml: its DN "
                                           "offset is unknown; pass offset= (--s2-offset), 1000 for processing "
                                           "baseline >= 04.00, else 0")
            return _Metadata(level=_level(self.path.name))
        where = self.raster_path(self.mtd)
        try:
            return parse_metadata(self.read_bytes(self.mtd), where)
        except OSError as e:
            raise DataError(where, f"cannot read the product metadata ({e})") from e

    def band_files(self) -> dict[str, str]:
        """band -> rasterio path of a SAFE product's band files, each at its native resolution."""
        images = [n for n in self.names if re.match(r"GRANULE/[^/]+/IMG_DATA/", n)
                  and PurePosixPath(n).suffix.lower() in RASTER_SUFFIXES]
        granules = sorted({n.split("/")[1] for n in images})
        if len(granules) != 1:
            found = f"{len(granules)} granules ({', '.join(granules)})" if granules else "no band files"
            raise DataError(self.path, f"expected the band files of one granule under GRANULE/*/IMG_DATA, found "
                                       f"{found}")
        candidates: dict[str, list[tuple[int | None, str]]] = {}
        for name in images:
            band = band_in_filename(self.raster_path(name))
            if band is not None:
                m = _RESOLUTION_TOKEN.search(name.split("IMG_DATA/", 1)[1])
                candidates.setdefault(band, []).append((int(m.group(1)) if m else None, name))
        return {b: self.raster_path(_native(b, candidates[b], self.raster_path))
                for b in contract.S2_BANDS if b in candidates}


def _native(band: str, candidates: list[tuple[int | None, str]], where) -> str:
    """The file of `band` at its native resolution (else the finest; a file without a resolution tag counts as
    native); DataError naming both files when two are equally good."""
    def rank(item):
        resolution = item[0] if item[0] is not None else NATIVE_RESOLUTION[band]
        return (resolution != NATIVE_RESOLUTION[band], resolution)

    ordered = sorted(candidates, key=rank)
    if len(ordered) > 1 and rank(ordered[0]) == rank(ordered[1]):
        raise DataError(where(ordered[1][1]), f"second file for band {band} (the other is "
                                              f"{where(ordered[0][1])}); keep one")
    return ordered[0][1]


def parse_metadata(xml: bytes, where: str | os.PathLike) -> _Metadata:
    """The level, processing baseline, per-band DN offsets and quantification of a product's MTD_MSIL1C.xml /
    MTD_MSIL2A.xml (namespaces ignored). Offsets are DN to subtract: -RADIO_ADD_OFFSET (L1C) or
    -BOA_ADD_OFFSET (L2A), mapped to bands through Spectral_Information's bandId/physicalBand (else the standard
    order, band_id 0..12 = B01..B12 with B8A at 8)."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as e:
        raise DataError(where, f"product metadata is not valid XML ({e})") from e
    level, baseline, ids = _level(_local(root.tag)), None, dict(enumerate(contract.S2_BANDS))
    values: dict[str, Any] = {}
    try:
        for el in root.iter():
            tag, text = _local(el.tag), (el.text or "").strip()
            if tag == "PROCESSING_LEVEL" and _level(text):
                level = _level(text)
            elif tag == "PROCESSING_BASELINE" and text:
                baseline = tuple(int(p) for p in text.split(".")[:2])
            elif tag in ("QUANTIFICATION_VALUE", "BOA_QUANTIFICATION_VALUE"):
                values[tag] = float(text)
            elif tag in ("RADIO_ADD_OFFSET", "BOA_ADD_OFFSET"):
                values.setdefault(tag, {})[int(el.get("band_id", ""))] = float(text)
            elif tag == "Spectral_Information" and band_name(el.get("physicalBand")):
                ids[int(el.get("bandId", ""))] = band_name(el.get("physicalBand"))
    except ValueError as e:
        raise DataError(where, f"unreadable value in the product metadata ({e})") from e
    l2a = level == "L2A"
    adds = values.get("BOA_ADD_OFFSET" if l2a else "RADIO_ADD_OFFSET")
    offsets = {ids[i]: -v for i, v in adds.items() if i in ids} if adds else None
    quantification = values.get("BOA_QUANTIFICATION_VALUE" if l2a else "QUANTIFICATION_VALUE")
    if quantification is not None and quantification <= 0:
        raise DataError(where, f"quantification value {quantification:g} is not positive")
    return _Metadata(level=level, baseline=baseline, offsets=offsets, quantification=quantification)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# ------------------------------------------------------------------------------------------------------ units


def detect_units(sources: dict[str, _Source], nodata: float | None) -> dict[str, str]:
    """'dn' or 'reflectance' per file, from a few sampled windows of each (never the whole file): integer files
    hold DN; float files whose sampled finite, non-nodata values all lie in [0, `REFLECTANCE_MAX`] hold
    reflectance, others DN (an all-empty sample counts as DN)."""
    found: dict[str, str] = {}
    for source in sources.values():
        ds = source.reader if source.on_grid else source.reader.src_dataset
        key = f"{source.path}#{source.index if source.on_grid else 1}"
        if key in found:
            continue
        index = source.index if source.on_grid else 1
        if not np.issubdtype(np.dtype(ds.dtypes[index - 1]), np.floating):
            found[key] = "dn"
            continue
        values = np.concatenate([_sample(ds, index, w, source.path) for w in _sample_windows(ds)])
        keep = np.isfinite(values)
        if nodata is not None and not math.isnan(nodata):
            keep &= values != np.float32(nodata)
        values = values[keep]
        reflectance = values.size and values.min() >= 0 and values.max() <= REFLECTANCE_MAX
        found[key] = "reflectance" if reflectance else "dn"
    return {key.rpartition("#")[0]: unit for key, unit in found.items()}


def _sample_windows(ds) -> list[Window]:
    """Up to `UNITS_SAMPLE_WINDOWS` windows: the centre and the centres of the four quadrants."""
    size_y, size_x = min(UNITS_SAMPLE_SIZE, ds.height), min(UNITS_SAMPLE_SIZE, ds.width)
    centres = [(0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)][:UNITS_SAMPLE_WINDOWS]
    windows = {(min(max(int(fy * ds.height) - size_y // 2, 0), ds.height - size_y),
                min(max(int(fx * ds.width) - size_x // 2, 0), ds.width - size_x)) for fy, fx in centres}
    return [Window(x, y, size_x, size_y) for y, x in sorted(windows)]


def _sample(ds, index: int, window: Window, path: str) -> np.ndarray:
    try:
        return ds.read(index, window=window, out_dtype="float32").ravel()
    except rasterio.errors.RasterioError as e:
        raise DataError(path, f"cannot read (truncated or corrupt file?) ({e})") from e


def _units_scale(path: Path, sources: dict[str, _Source], nodata: float | None, units: str) -> float:
    """The factor taking the files' values to DN: 1 (DN) or 10000 (reflectance), by `units` or detected."""
    if units != "auto":
        return contract.S2_DN_MAX if units == "reflectance" else 1.0
    found = detect_units(sources, nodata)
    kinds = set(found.values())
    if kinds == {"reflectance"}:
        log.warning("%s: float values within [0, %g]: read as reflectance and multiplied by %g (units='dn' or "
                    "'reflectance' to force)", path if len(found) > 1 else next(iter(found)), REFLECTANCE_MAX,
                    contract.S2_DN_MAX)
        return contract.S2_DN_MAX
    if len(kinds) > 1:
        mixed = ", ".join(f"{p}: {u}" for p, u in found.items())
        raise DataError(path, f"band files mix DN and reflectance values ({mixed}); convert them to one, or "
                              "force units='dn' / 'reflectance'")
    return 1.0
