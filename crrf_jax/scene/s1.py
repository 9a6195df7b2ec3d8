"""Sentinel-1 VV, VH on a target (Sentinel-2) grid, in dB, whatever the file's grid, band order and units.

`open_s1` opens the SAR GeoTIFF and returns an `S1Scene` that reads rows of the target grid:

- Grid: a file on the target grid (`contract.check_same_grid`: same size, CRS and transform to a thousandth of
  a pixel) is read by plain windows. Any other grid (another CRS or UTM zone, 20 m pixels, a smaller or
  shifted extent) is reprojected onto the target with GDAL's warper (`rasterio.vrt.WarpedVRT`, bilinear),
  one row block at a time, so a 10980 x 10980 grid never sits in memory whole. Resampling happens in the
  file's units (linear power is averaged as power, then converted). Target pixels the SAR footprint does not
  reach, and the file's nodata (or NaN) pixels, read as NaN; `S1Scene.coverage` says which pixels have both
  bands.
- Units: dB (the model's unit) or linear power (sigma0 / gamma0, typically 1e-4..1), which is converted to
  dB as 10 log10(max(x, 1e-6)). `units="auto"` tells them apart from a few sampled windows (`detect_units`).
  Amplitude (the square root of power) and digital numbers are not supported: square amplitude into power,
  or convert either to dB, first. Values outside [-60, 30] dB after conversion are reported (once per band).
- Band order: band descriptions naming the polarisation ("VV", "vh", "Sigma0_VV_db", ...) decide which band
  is VV; a file with VH first is reordered. Without such descriptions band 1 is taken as VV and band 2 as VH
  (logged). HH/HV files and other band counts are refused (DataError naming the file).
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import array_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from crrf_jax.data import contract
from crrf_jax.data.contract import DataError

log = logging.getLogger(__name__)

UNITS = ("auto", "db", "linear")
LINEAR_FLOOR = 1e-6  # linear power below this (zeros, negative noise-removal residue) reads as -60 dB
PLAUSIBLE_DB = (-60.0, 30.0)  # dB outside this range after conversion is reported
LINEAR_MEDIAN_MAX = 1.5  # linear power: nearly all values >= 0 and the median below this
LINEAR_NONNEGATIVE = 0.99  # the share of sampled values that must be >= 0 for linear power
SAMPLE_WINDOWS = 5  # windows sampled by detect_units: the centre and the centres of the four quadrants
SAMPLE_SIZE = 256  # pixels on a side of each sampled window

_POLARISATION = re.compile(r"(?<![A-Z])(VV|VH|HH|HV)(?![A-Z])")


class S1Scene:
    """Sentinel-1 VV, VH of one file on a target grid; a context manager (closes the file). Made by `open_s1`.

    Attributes: path (the file); units (the file's units as used: "db" or "linear"; `read` always returns
    dB); order (("VV", "VH"), the channel order of `read`); indexes (the file's 1-based bands read as VV, VH);
    warped (True when the file is reprojected onto the target grid, False for plain windowed reads);
    width, height (the target grid's size).
    """

    def __init__(self, path: Path, source, *, indexes: tuple[int, int], units: str, warped: bool,
                 nodata: float | None, width: int, height: int, stack: ExitStack):
        self.path, self.units, self.order, self.indexes = str(path), units, contract.S1_BANDS, indexes
        self.warped, self.width, self.height = warped, width, height
        self._source, self._nodata, self._stack = source, nodata, stack
        self._reported: set[int] = set()
        self._coverage: tuple[int, int, np.ndarray] | None = None

    def read(self, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of the target grid, full width: (rows, width, 2) float32 dB (VV, VH); NaN where the
        SAR footprint does not cover the pixel, or the file holds nodata, NaN or Inf there."""
        if not 0 <= y0 < y1 <= self.height:
            raise ValueError(f"{self.path}: rows [{y0}, {y1}) outside the target grid's 0..{self.height}")
        window = Window(0, y0, self.width, y1 - y0)
        try:
            raw = self._source.read(list(self.indexes), window=window, out_dtype="float32")
        except rasterio.errors.RasterioError as e:
            raise DataError(self.path, f"cannot read rows {y0}..{y1} (truncated or corrupt file?) ({e})") from e
        values = np.moveaxis(raw, 0, -1)
        bad = ~np.isfinite(values)
        if self._nodata is not None:
            bad |= values == np.float32(self._nodata)
        values[bad] = np.nan
        if self.units == "linear":
            values = to_db(values)
        self._report_implausible(values)
        self._coverage = (y0, y1, np.all(np.isfinite(values), axis=-1))
        return values

    def coverage(self, y0: int, y1: int) -> np.ndarray:
        """(rows, width) bool for rows [y0, y1): True where both bands have SAR data (no NaN in `read`).
        Free right after `read` of the same rows; otherwise it reads them."""
        if self._coverage is None or self._coverage[:2] != (y0, y1):
            self.read(y0, y1)
        return self._coverage[2].copy()

    def _report_implausible(self, db: np.ndarray) -> None:
        for channel, name in enumerate(self.order):
            if channel in self._reported:
                continue
            band = db[..., channel]
            band = band[np.isfinite(band)]
            low, high = PLAUSIBLE_DB
            if band.size and (band.min() < low or band.max() > high):
                self._reported.add(channel)
                log.warning("%s: band %d (%s) has values from %.3g to %.3g dB, outside the plausible [%g, %g]; "
                            "are its units right (units='db' | 'linear', --s1-units)?", self.path,
                            self.indexes[channel], name, band.min(), band.max(), low, high)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_s1(path: str | os.PathLike, *, crs: Any, transform: Any, width: int, height: int,
            units: str = "auto") -> S1Scene:
    """Opens the Sentinel-1 GeoTIFF at `path` to be read on the target grid (crs, transform, width, height).

    `units`: "auto" (`detect_units`), "db" or "linear" (power; converted to dB). See the module docstring
    for grids, units and band order. Raises DataError naming the file: missing or unreadable, not 2 float
    bands, HH/HV polarisation, undecidable units, no CRS while off the target grid, or no overlap with it.
    """
    if units not in UNITS:
        raise ValueError(f"S1 units must be one of {', '.join(UNITS)}; got {units!r}")
    path = Path(path)
    target = SimpleNamespace(crs=crs, transform=transform, width=int(width), height=int(height))
    stack = ExitStack()
    try:
        with rasterio.Env(**contract.GDAL_ENV):
            ds = contract.open_geotiff(path, stack, "Sentinel-1", count=len(contract.S1_BANDS),
                                       dtypes=contract.S1_DTYPES)
            indexes = band_order(ds.descriptions, path)
            warped = not _on_grid(ds, path, target)
            source = _warp(ds, path, target, stack) if warped else ds
            if units == "auto":
                units = detect_units(ds, path)
    except BaseException:
        stack.close()
        raise
    return S1Scene(path, source, indexes=indexes, units=units, warped=warped, nodata=None if warped else ds.nodata,
                   width=target.width, height=target.height, stack=stack)


def to_db(power: np.ndarray) -> np.ndarray:
    """Linear power -> float32 dB, 10 log10(max(x, 1e-6)); NaN stays NaN."""
    return (10.0 * np.log10(np.maximum(np.asarray(power, np.float32), np.float32(LINEAR_FLOOR)))).astype(np.float32)


def band_order(descriptions, path: str | os.PathLike) -> tuple[int, int]:
    """The file's 1-based bands holding (VV, VH), from band descriptions naming the polarisation."""
    found = [set(_POLARISATION.findall((d or "").upper())) for d in descriptions]
    names = [next(iter(f)) if len(f) == 1 else None for f in found]
    if names == ["VV", "VH"]:
        return (1, 2)
    if names == ["VH", "VV"]:
        log.info("%s: bands described as %s; reading band 2 as VV and band 1 as VH", path, list(descriptions))
        return (2, 1)
    if any(n in ("HH", "HV") for n in names):
        raise DataError(path, f"bands are described as {list(descriptions)}: HH/HV polarisation; the model "
                              "takes Sentinel-1 VV and VH")
    if any(descriptions):
        log.warning("%s: band descriptions %s do not name VV and VH; taking band 1 as VV and band 2 as VH",
                    path, list(descriptions))
    else:
        log.info("%s: no band descriptions; taking band 1 as VV and band 2 as VH", path)
    return (1, 2)


def detect_units(ds, path: str | os.PathLike) -> str:
    """"linear" or "db" for the open dataset `ds`, from `SAMPLE_WINDOWS` windows of both bands.

    Linear power: at least 99% of the valid sampled values >= 0 and their median below 1.5 (sigma0 is
    typically 1e-4..1; noise removal can leave a few values below 0). dB: any other file with a fair share of
    negative values (backscatter is mostly -30..+5 dB). Values all >= 0 with a larger median (amplitude in
    other scalings, digital numbers) fit neither: DataError. Windows without valid values: assumed dB, logged.
    """
    values = _sample(ds, path)
    if values.size == 0:
        log.warning("%s: no valid values in the sampled windows; taking its units as dB", path)
        return "db"
    nonnegative, median = float(np.mean(values >= 0)), float(np.median(values))
    if nonnegative < LINEAR_NONNEGATIVE:
        return "db"
    if median < LINEAR_MEDIAN_MAX:
        log.warning("%s: Sentinel-1 values look like linear power (median %.3g, %.1f%% >= 0); converting to dB "
                    "as 10 log10(x); force the units with units='db' (--s1-units db) if they are dB",
                    path, median, 100 * nonnegative)
        return "linear"
    raise DataError(path, f"Sentinel-1 values are all >= 0 with median {median:.3g}: neither dB (mostly negative) "
                          "nor linear power (mostly below 1.5); amplitude or digital numbers are not supported. "
                          "Convert to dB or linear power, or force the units (units='db'|'linear', --s1-units)")


def _sample(ds, path) -> np.ndarray:
    """The valid (finite, not nodata) values of both bands in the sampled windows, flattened."""
    size_y, size_x = min(SAMPLE_SIZE, ds.height), min(SAMPLE_SIZE, ds.width)
    centres = [(0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)][:SAMPLE_WINDOWS]
    found = []
    for fy, fx in centres:
        y0 = min(max(int(fy * ds.height) - size_y // 2, 0), ds.height - size_y)
        x0 = min(max(int(fx * ds.width) - size_x // 2, 0), ds.width - size_x)
        try:
            block = ds.read(window=Window(x0, y0, size_x, size_y), out_dtype="float64")
        except rasterio.errors.RasterioError as e:
            raise DataError(path, f"cannot read a window at row {y0}, column {x0} ({e})") from e
        valid = np.isfinite(block)
        if ds.nodata is not None:
            valid &= block != ds.nodata
        found.append(block[valid])
    return np.concatenate(found)


def _on_grid(ds, path: Path, target) -> bool:
    """Whether `ds` lies on the target grid (contract.check_same_grid); DataError if it does not and cannot
    be reprojected (a CRS missing on either side)."""
    try:
        contract.check_same_grid(ds, path, target, "the Sentinel-2 grid")
        return True
    except DataError as e:
        if ds.crs is None or target.crs is None:
            side = "the file" if ds.crs is None else "the target grid"
            raise DataError(path, f"{e.reason}; {side} has no CRS, so it cannot be reprojected") from e
        return False


def _warp(ds, path: Path, target, stack: ExitStack):
    """A bilinear WarpedVRT of `ds` on the target grid (float32, NaN outside the footprint and at nodata)."""
    left, bottom, right, top = transform_bounds(ds.crs, target.crs, *ds.bounds, densify_pts=21)
    t_left, t_bottom, t_right, t_top = array_bounds(target.height, target.width, target.transform)
    if left >= t_right or right <= t_left or bottom >= t_top or top <= t_bottom:
        raise DataError(path, f"the Sentinel-1 footprint ({ds.crs}, bounds {tuple(ds.bounds)}) does not overlap "
                              "the Sentinel-2 grid")
    log.info("%s: reprojecting Sentinel-1 (%s, %.3g m pixels, %dx%d) onto the Sentinel-2 grid (bilinear)",
             path, ds.crs, abs(ds.transform.a), ds.height, ds.width)
    nodata = ds.nodata if ds.nodata is not None else np.nan
    return stack.enter_context(WarpedVRT(
        ds, crs=target.crs, transform=target.transform, width=target.width, height=target.height,
        resampling=Resampling.bilinear, src_nodata=nodata, nodata=np.nan, dtype="float32",
    ))
