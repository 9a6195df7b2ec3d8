"""The output files of one scene prediction, written row block by row block, published whole or not at all.

`SceneOutputs` writes:

- the prediction: uint16 DN, one band per model band (band descriptions = band names), the input's nodata;
- optionally the uncertainty: float32, "<band> std" descriptions, NaN nodata where the input has nodata;
- optionally a change mask: uint8, 1 where the model changed the pixel, 0 where it kept it, 255 nodata
  (pixels that are nodata in every band of the prediction);
- optionally an RGB quicklook PNG: 8 bits, each band stretched between its 2nd and 98th percentile over the
  written image's valid pixels, the longer side at most `QUICKLOOK_SIZE` pixels.

Every raster carries the target grid's CRS and transform. With `cog=True` (the default) they are
Cloud-Optimized GeoTIFFs (tiled 512 x 512, overviews, compressed with a predictor) that GIS tools and HTTP
range readers open fast. GDAL's COG driver can only copy a finished image, so rows go to a tiled temporary
GeoTIFF (`<name>.partial`, in row stripes aligned to its 512-pixel tiles so no tile is written twice) and
`commit` converts it (`<name>.cog.partial`) before renaming. `cog=False` writes plain DEFLATE/ZSTD GeoTIFFs
straight into `<name>.partial`. Either way `commit` publishes each output by an atomic rename and `abort`
removes every partial file; an existing output is replaced only by a complete one.

The rasters are written side by side, each in a thread of its own (`write_rows` returns once all are
written; each dataset is only ever used by one thread at a time), and converted to COGs side by side too;
GDAL compresses each one's blocks on all cores.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window

from crrf_jax.data import contract

BLOCK = 512  # COG tile size, and the row stripes the temporary files are written in
QUICKLOOK_SIZE = 1024  # the quicklook's longer side at most
QUICKLOOK_PERCENTILES = (2.0, 98.0)
MASK_NODATA = 255
COMPRESSIONS = ("deflate", "zstd")
_PREDICTOR = {"uint16": 2, "uint8": 2, "float32": 3}
_FAST_LEVEL = {"deflate": {"ZLEVEL": 1}, "zstd": {"ZSTD_LEVEL": 1}}  # the temporary files: speed over size


class _Raster:
    """One output raster: its open partial dataset, and a buffer of rows waiting for a whole tile stripe."""

    def __init__(self, path: Path, profile: dict[str, Any], descriptions: Sequence[str], *, stripes: bool):
        self.path, self.dtype, self.stripes = path, profile["dtype"], stripes
        self.ds = rasterio.open(partial(path), "w", **profile)
        for i, name in enumerate(descriptions, start=1):
            self.ds.set_band_description(i, name)
        self.rows: list[np.ndarray] = []
        self.start = self.end = 0  # rows [start, end) are buffered

    def write(self, y0: int, block: np.ndarray) -> None:
        """Rows from `y0` as (rows, width, bands); buffered while they continue the buffered rows."""
        if y0 != self.end or not self.stripes:
            self.flush()
            self.start = self.end = y0
        self.rows.append(block.copy() if self.stripes else block)  # the caller may reuse its array
        self.end += len(block)
        if self.stripes and self.end // BLOCK > self.start // BLOCK:
            self.flush(upto=self.end // BLOCK * BLOCK)

    def flush(self, upto: int | None = None) -> None:
        """Writes the buffered rows before `upto` (all by default) and keeps the rest."""
        if not self.rows:
            return
        upto = self.end if upto is None else upto
        rows = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
        done = upto - self.start
        if done > 0:
            window = Window(0, self.start, rows.shape[1], done)
            self.ds.write(np.moveaxis(rows[:done], -1, 0), window=window)
        self.rows = [rows[done:]] if done < len(rows) else []
        self.start = upto

    def close(self) -> None:
        if not self.ds.closed:
            self.ds.close()


class SceneOutputs:
    """The outputs of one prediction (see the module docstring); rows arrive by `write_rows`, then `tag`,
    then `commit` (or `abort`). A context manager that aborts when its block raises (and does not commit).

    Args:
      out_path: the prediction GeoTIFF. crs, transform, width, height: the grid. band_names: one per band.
      nodata: the prediction's uint16 nodata (None: none); the uncertainty then has NaN nodata.
      uncertainty_path: the float32 std GeoTIFF (write_rows needs `std`). quicklook_path: the RGB PNG.
      rgb: the (red, green, blue) bands of the quicklook (None: a grey view of band 0).
      change_mask_path: the uint8 change mask GeoTIFF (write_rows needs `changed`).
      compress: "deflate" or "zstd". cog: Cloud-Optimized GeoTIFFs (else plain GeoTIFFs).
    """

    def __init__(self, out_path: str | os.PathLike, *, crs: Any, transform: Any, width: int, height: int,
                 band_names: Sequence[str], nodata: float | None, uncertainty_path: str | os.PathLike | None = None,
                 quicklook_path: str | os.PathLike | None = None, rgb: tuple[int, int, int] | None = None,
                 change_mask_path: str | os.PathLike | None = None, compress: str = "deflate", cog: bool = True):
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {', '.join(COMPRESSIONS)}; got {compress!r}")
        self.width, self.height, self.bands = int(width), int(height), len(band_names)
        self.nodata, self.compress, self.cog = nodata, compress, cog
        self.rgb = tuple(rgb) if rgb is not None else (0, 0, 0)
        if not all(0 <= b < self.bands for b in self.rgb):
            raise ValueError(f"quicklook bands {self.rgb} outside the {self.bands} output bands")
        self.quicklook_path = Path(quicklook_path) if quicklook_path else None
        self._published: list[tuple[Path, Path]] = []  # (finished partial, final path), filled by commit
        # NUM_THREADS: GDAL compresses the written blocks on all cores, not in the writing thread alone.
        self._base = {"driver": "GTiff", "width": self.width, "height": self.height, "crs": crs,
                      "transform": transform, "compress": compress, "BIGTIFF": "IF_SAFER",
                      "NUM_THREADS": "ALL_CPUS"}
        if cog:
            self._base.update(tiled=True, blockxsize=BLOCK, blockysize=BLOCK, **_FAST_LEVEL[compress])
        self.out = self.std = self.mask = None
        self._pool: ThreadPoolExecutor | None = None  # write_rows' threads beside the caller's, made when needed
        try:
            self.out = self._create(out_path, "uint16", nodata, list(band_names))
            if uncertainty_path:
                self.std = self._create(uncertainty_path, "float32", np.nan if nodata is not None else None,
                                        [f"{b} std" for b in band_names])
            if change_mask_path:
                self.mask = self._create(change_mask_path, "uint8", MASK_NODATA, ["changed"])
        except BaseException:
            self.abort()
            raise

    def _create(self, path, dtype: str, nodata, descriptions) -> _Raster:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        profile = {**self._base, "count": len(descriptions), "dtype": dtype, "nodata": nodata}
        with rasterio.Env(**contract.GDAL_ENV):
            return _Raster(path, profile, descriptions, stripes=self.cog)

    @property
    def _rasters(self) -> list[_Raster]:
        return [r for r in (self.out, self.std, self.mask) if r is not None]

    def write_rows(self, y0: int, y1: int, dn: np.ndarray, std: np.ndarray | None = None,
                   changed: np.ndarray | None = None) -> None:
        """Rows [y0, y1): `dn` (rows, width, bands) uint16 as written (nodata pixels already nodata);
        `std` (rows, width, bands) float32 reflectance std, needed with an uncertainty output; `changed`
        (rows, width) bool, True where the model changed the pixel, needed with a change mask."""
        rows = y1 - y0
        if not 0 <= y0 < y1 <= self.height:
            raise ValueError(f"rows [{y0}, {y1}) outside the output's 0..{self.height}")
        _check(dn, "dn", (rows, self.width, self.bands), np.uint16)
        writes = [lambda: self.out.write(y0, dn)]
        if self.std is not None:
            _check(std, "std", (rows, self.width, self.bands), np.floating)
            writes.append(lambda: self.std.write(y0, self._std_rows(dn, std)))
        if self.mask is not None:
            _check(changed, "changed", (rows, self.width), np.bool_)
            writes.append(lambda: self.mask.write(y0, self._mask_rows(dn, changed)))
        self._side_by_side(writes)

    def _std_rows(self, dn: np.ndarray, std: np.ndarray) -> np.ndarray:
        std = std.astype(np.float32)
        if self.nodata is not None:
            std = np.where(self._empty(dn)[..., None], np.float32(np.nan), std)
        return std

    def _mask_rows(self, dn: np.ndarray, changed: np.ndarray) -> np.ndarray:
        mask = changed.astype(np.uint8)
        if self.nodata is not None:
            mask[self._empty(dn)] = MASK_NODATA
        return mask[..., None]

    def _side_by_side(self, calls: list[Callable[[], None]]) -> None:
        """Runs `calls` (one for each raster) at once, one in this thread; raises the first error once all
        have ended."""
        if self._pool is None and len(calls) > 1:  # GDAL's settings are the process's: threads share them
            self._pool = ThreadPoolExecutor(len(self._rasters) - 1, thread_name_prefix="write_raster")
        others = [self._pool.submit(call) for call in calls[1:]]
        errors = []
        for wait in [calls[0], *(f.result for f in others)]:
            try:
                wait()
            except BaseException as e:  # every call ends before the first error is raised
                errors.append(e)
        if errors:
            raise errors[0]

    def _empty(self, dn: np.ndarray) -> np.ndarray:
        """(rows, width) bool: nodata in every band."""
        return np.all(dn == self.nodata, axis=-1)

    def tag(self, **tags) -> None:
        """Adds metadata tags (values as strings, with software=crrf-jax) to every GeoTIFF output."""
        for raster in self._rasters:
            raster.ds.update_tags(software="crrf-jax", **{k: str(v) for k, v in tags.items()})

    def commit(self) -> None:
        """Finishes every output: flushes and closes the partial files, converts them to COGs (cog=True),
        writes the quicklook, then renames each finished file over its final path. On failure every partial
        file is removed (`abort`) and the error raised."""
        try:
            with rasterio.Env(**contract.GDAL_ENV):
                self._side_by_side([functools.partial(self._finish, raster) for raster in self._rasters])
                self._published = [(_cog_partial(r.path) if self.cog else partial(r.path), r.path)
                                   for r in self._rasters]
                if self.quicklook_path is not None:
                    self._write_quicklook(self._published[0][0], partial(self.quicklook_path))
                    self._published.append((partial(self.quicklook_path), self.quicklook_path))
            for finished, final in self._published:
                os.replace(finished, final)
        except BaseException:
            self.abort()
            raise
        self._close_pool()
        for raster in self._rasters:
            partial(raster.path).unlink(missing_ok=True)

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _finish(self, raster: _Raster) -> None:
        """Flushes and closes `raster`'s partial file, and converts it to a COG (cog=True)."""
        raster.flush()
        raster.close()
        if self.cog:
            self._to_cog(partial(raster.path), _cog_partial(raster.path), raster.dtype)

    def _to_cog(self, src: Path, dst: Path, dtype: str) -> None:
        resampling = "NEAREST" if dtype == "uint8" else "AVERAGE"  # the mask is categorical
        rasterio.shutil.copy(src, dst, driver="COG", compress=self.compress, predictor=_PREDICTOR[dtype],
                             overviews="AUTO", blocksize=BLOCK, BIGTIFF="IF_SAFER", OVERVIEW_RESAMPLING=resampling,
                             NUM_THREADS="ALL_CPUS")

    def _write_quicklook(self, src: Path, dst: Path) -> None:
        """The RGB PNG from the written prediction `src`, read decimated (from its overviews where present)."""
        with rasterio.open(src) as ds:
            scale = min(1.0, QUICKLOOK_SIZE / max(ds.width, ds.height))
            shape = (max(1, round(ds.height * scale)), max(1, round(ds.width * scale)))
            rgb = ds.read([b + 1 for b in self.rgb], out_shape=(3, *shape), resampling=Resampling.average)
        image = quicklook(np.moveaxis(rgb, 0, -1), self.nodata)
        with warnings.catch_warnings():  # a picture, deliberately without georeferencing
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(dst, "w", driver="PNG", width=shape[1], height=shape[0], count=3,
                               dtype="uint8") as png:
                png.write(np.moveaxis(image, -1, 0))

    def abort(self) -> None:
        """Closes and removes every partial file (the final paths are left as they were)."""
        self._close_pool()
        for raster in self._rasters:
            raster.close()
        paths = [p for r in self._rasters for p in (partial(r.path), _cog_partial(r.path))]
        if self.quicklook_path is not None:
            paths.append(partial(self.quicklook_path))
        for path in paths:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".aux.xml").unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()


def quicklook(rgb: np.ndarray, nodata: float | None) -> np.ndarray:
    """(H, W, 3) DN -> (H, W, 3) uint8: each band stretched linearly from its 2nd to its 98th percentile
    over the pixels that are not nodata in every band (those are black)."""
    rgb = rgb.astype(np.float32)
    valid = ~np.all(rgb == nodata, axis=-1) if nodata is not None else np.ones(rgb.shape[:2], bool)
    out = np.zeros(rgb.shape, np.uint8)
    if not valid.any():
        return out
    for c in range(3):
        low, high = np.percentile(rgb[..., c][valid], QUICKLOOK_PERCENTILES)
        stretched = (rgb[..., c] - low) / max(high - low, 1e-6)
        out[..., c] = np.rint(np.clip(stretched, 0.0, 1.0) * 255).astype(np.uint8)
    out[~valid] = 0
    return out


def _check(array: np.ndarray | None, name: str, shape: tuple[int, ...], kind) -> None:
    if array is None:
        raise ValueError(f"write_rows needs `{name}` for this output")
    if array.shape != shape or not np.issubdtype(array.dtype, kind):
        raise ValueError(f"`{name}` must be {shape} {np.dtype(kind).name if kind is not np.floating else 'float'}"
                         f", got {array.shape} {array.dtype}")


def partial(path: Path) -> Path:
    """Where the output `path` is written before `commit`: `<name>.partial`."""
    return path.with_name(path.name + ".partial")


def _cog_partial(path: Path) -> Path:
    return path.with_name(path.name + ".cog.partial")
