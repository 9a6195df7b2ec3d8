"""Cloud removal on a user's Sentinel-2 scene of any size, keeping its georeferencing.

    python -m crrf_jax.predict --bundle=B --s2=SCENE [--s1=sar.tif] [--cloud-prob=p.tif] --out=clear.tif
        [--uncertainty=std.tif] [--quicklook=rgb.png] [--change-mask=changed.tif] [--steps N] [--samples K]
        [--guidance S] [--seed 0] [--tile 256 --overlap 32] [--keep-clear 0.2]

Inputs (checked; errors name the file and, for flags, the flag):
  --s2          a Sentinel-2 product as users have it (`crrf_jax.scene.s2`): a `.SAFE` folder or its `.zip`
                (L1C or L2A; the processing-baseline offset read from its metadata), a folder of per-band
                files named by band (20 m and 60 m bands resampled onto the 10 m grid), or a stacked GeoTIFF
                in SEN12MS-CR band order (13 bands, or 12 named bands of L2A). `--s2-offset` sets the DN
                offset of files that lost their metadata (1000 for baseline 04.00 and later). Reflectance
                floats are detected and scaled (`--s2-units`). A model that needs B10 on an L2A product
                asks for `--fill-b10` or a band-subset model; a product level other than the model's
                (L1C) is warned about.
  --s1          Sentinel-1 VV, VH (`crrf_jax.scene.s1`) on any grid: reprojected (bilinear) onto the S2
                grid; dB or linear power (detected, or `--s1-units`); band order from descriptions. Tiles the
                SAR footprint does not cover run the model's SAR-absent mode, as does the whole scene
                without --s1 (a warning says so).
  --cloud-prob  s2cloudless probability on the S2 grid: 1 band, uint8 (x255, crrf_jax.data.cloudprob's cache)
                or float in [0, 1]. Computed with s2cloudless when absent (it needs B01..B12 with B10).
Several dates (a multi-temporal bundle, `max_dates` > 1): repeat `--s2` once per date, in chronological order
(and `--s1`, `--cloud-prob` once per date too, or not at all). Every date is read on the first date's grid
(the same size, CRS and transform, checked: products of one tile and orbit share it); the outputs are on it.
What "came in" for `--keep-clear` and `--change-mask` is then the least-cloudy composite of the dates (each
pixel from the date with the lowest cloud probability), the image the model starts from.
Outputs (`crrf_jax.scene.outputs`, Cloud-Optimized GeoTIFFs unless `--no-cog`): `--out` with the model's
bands (13 for a full model) as uint16 DN (reflectance x 10000), named by band, with the input's CRS,
transform, size and nodata; `--uncertainty` the per-band standard deviation over the K samples (float32
reflectance); `--quicklook` an RGB PNG; `--change-mask` uint8, 1 where the model changed a pixel by more than
`CHANGE_DN` in some band. With `--keep-clear P`, pixels whose cloud probability is below P are written exactly
as they came in (same DN, std 0). Outputs appear complete or not at all. The scene streams one row of tiles
at a time (reading the next row, and blending and writing finished rows, while the device works on the
current batches: `crrf_jax.tiling.blend_tiles`), so memory stays bounded on a 10980 x 10980 tile.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from crrf_jax import parallel, references
from crrf_jax.bundle import BundleError
from crrf_jax.data import contract
from crrf_jax.data.contract import DataError
from crrf_jax.inference import CloudRemover
from crrf_jax.scene import outputs as scene_outputs
from crrf_jax.scene import s1 as scene_s1
from crrf_jax.scene import s2 as scene_s2
from crrf_jax.tiling import TileLayout, pad_to

log = logging.getLogger(__name__)

CHANGE_DN = 100  # --change-mask: changed = some band moved by more than this many DN (0.01 reflectance)
TRAINED_LEVEL = "L1C"  # SEN12MS-CR's processing level, what every bundle so far was trained on
# GDAL decodes a read's blocks (GeoTIFF, JPEG 2000) and warps the SAR onto the S2 grid on all cores, not in
# the reading threads alone (BENCHMARKS.md, Scene prediction). The values are the same.
READ_ENV = {**contract.GDAL_ENV, "GDAL_NUM_THREADS": "ALL_CPUS"}


# ------------------------------------------------------------------------------------------------------------
# Scene prediction
# ------------------------------------------------------------------------------------------------------------


def predict_scene(
    remover: CloudRemover,
    s2_path: str | os.PathLike | Sequence[str | os.PathLike],
    s1_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    cloud_prob_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    out_path: str | os.PathLike,
    uncertainty_path: str | os.PathLike | None = None,
    quicklook_path: str | os.PathLike | None = None,
    change_mask_path: str | os.PathLike | None = None,
    s2_offset: float | None = None,
    s2_units: str = "auto",
    fill_b10: bool = False,
    s1_units: str = "auto",
    cog: bool = True,
    compress: str = "deflate",
    steps: int | None = None,
    num_samples: int = 1,
    guidance_scale: float | None = None,
    seed: int = 0,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int = 8,
    keep_clear: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Removes clouds from the Sentinel-2 scene `s2_path` and writes `out_path` (and the optional outputs).

    The Python face of the CLI: see the module docstring for the inputs and outputs. The S2 and S1 options
    are those of `crrf_jax.scene.s2.open_s2` and `crrf_jax.scene.s1.open_s1`; the sampling and tiling ones
    those of `CloudRemover.remove_clouds`. Several dates: a sequence of paths for each input (one per date,
    in chronological order). Returns a summary (size, tiles, seconds, use_sar, level, kind, dates).
    Raises DataError naming the file for bad inputs. Existing outputs are replaced; on failure no output (or
    partial file) is left. With several processes every process calls it alike; process 0 writes the files.
    """
    out_path = Path(out_path)
    s2_paths, s1_paths, prob_paths = _dated_paths(remover, s2_path, s1_path, cloud_prob_path)
    optional = {name: Path(p) if p else None for name, p in (
        ("uncertainty", uncertainty_path), ("quicklook", quicklook_path), ("change_mask", change_mask_path))}
    _check_distinct([Path(p) for p in (*s2_paths, *s1_paths, *prob_paths)],
                    [out_path, *[p for p in optional.values() if p is not None]])
    tile, overlap = remover.check_tiling(tile_size, overlap)
    start = time.perf_counter()
    writer = None
    with rasterio.Env(**READ_ENV), contextlib.ExitStack() as stack:
        opened = []
        for d, path in enumerate(s2_paths):  # every later date on the first date's grid
            opened.append(_open_inputs(stack, remover, path, s1_paths[d] if s1_paths else None,
                                       prob_paths[d] if prob_paths else None,
                                       dict(offset=s2_offset, fill_b10=fill_b10, units=s2_units), s1_units,
                                       grid=opened[0][0] if opened else None))
        s2, s1, prob = opened[0]
        layout = TileLayout(s2.height, s2.width, tile, overlap)
        reader, readers = _readers(stack, remover, layout, opened, prob_paths, change_mask_path is not None)
        if parallel.is_writer():
            writer = scene_outputs.SceneOutputs(
                out_path, crs=s2.crs, transform=s2.transform, width=s2.width, height=s2.height,
                band_names=remover.band_names, nodata=reader.nodata, uncertainty_path=optional["uncertainty"],
                quicklook_path=optional["quicklook"], rgb=_rgb(remover.band_names),
                change_mask_path=optional["change_mask"], compress=compress, cog=cog)
        try:
            write = _Writes(writer, reader) if writer is not None else _discard_rows
            remover.process(layout, reader.read_rows, write, steps=steps, num_samples=num_samples,
                            guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                            keep_clear=keep_clear, progress=progress and writer is not None,
                            dates=len(readers) if len(readers) > 1 else None, with_std=bool(uncertainty_path))
            if writer is not None:
                writer.tag(steps=steps or remover.config["sampling"]["steps"], samples=num_samples, seed=seed,
                           use_sar=s1 is not None, tile=tile, overlap=overlap, keep_clear=keep_clear,
                           s2_level=s2.level, s2_offset=s2.offset, dates=len(readers))
                writer.commit()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    return {"height": layout.height, "width": layout.width, "tiles": layout.num_tiles,
            "use_sar": s1 is not None,
            "level": s2.level, "kind": s2.kind, "dates": len(readers), "seconds": time.perf_counter() - start}


def _dated_paths(remover, s2_path, s1_path, prob_path) -> tuple[list, list, list]:
    """Each input as a list of paths, one per date (empty: not given); checked against each other and the
    model's max_dates."""
    def as_list(p):
        return [] if p is None else [p] if isinstance(p, str | os.PathLike) else list(p)

    s2, s1, prob = as_list(s2_path), as_list(s1_path), as_list(prob_path)
    if not 1 <= len(s2) <= remover.max_dates:
        raise ValueError(f"{len(s2)} Sentinel-2 dates given; this model takes 1 to max_dates={remover.max_dates}")
    for name, paths in (("Sentinel-1", s1), ("cloud-probability", prob)):
        if paths and len(paths) != len(s2):
            raise ValueError(f"{len(paths)} {name} files for {len(s2)} Sentinel-2 dates: give one per date")
    return s2, s1, prob


def _open_inputs(stack, remover, s2_path, s1_path, prob_path, s2_options: dict, s1_units: str, grid=None):
    """The opened (S2Scene, S1Scene or None, cloud-probability dataset or None), checked; with `grid` (the
    first date's S2Scene) the S2 scene must lie on that grid."""
    s2 = stack.enter_context(scene_s2.open_s2(s2_path, **s2_options))
    if grid is not None:
        contract.check_same_grid(_GridOf(s2), s2.path, _GridOf(grid), grid.path)
    scene_s2.warn_level_mismatch(s2, TRAINED_LEVEL)
    s1 = prob = None
    if remover.use_sar(s1_path is not None):  # warns for the degraded mode, or a model trained without SAR
        s1 = stack.enter_context(scene_s1.open_s1(s1_path, crs=s2.crs, transform=s2.transform, width=s2.width,
                                                  height=s2.height, units=s1_units))
    if prob_path is not None:
        prob = contract.open_geotiff(prob_path, stack, "cloud probability", count=1,
                                     dtypes=contract.CLOUD_PROB_DTYPES, grid_of=(_GridOf(s2), s2.path))
    return s2, s1, prob


def _readers(stack, remover, layout, opened, prob_paths, changes: bool):
    """(the scene's reader: one date's `_SceneReader` or several dates' `_DatesReader`, the per-date readers),
    each closed with `stack`."""
    readers = [stack.enter_context(_SceneReader(remover, layout, *inputs, path, changes=changes))
               for inputs, path in zip(opened, prob_paths or [None] * len(opened), strict=True)]
    return (readers[0] if len(readers) == 1 else stack.enter_context(_DatesReader(readers))), readers


def _check_distinct(inputs: list[Path], outputs: list[Path]) -> None:
    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in resolved:
            raise ValueError(f"{out}: output path is also an input")
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError(f"output paths must differ: {', '.join(map(str, outputs))}")


class _GridOf:
    """An S2Scene's grid as `contract.check_same_grid` reads it (crs, transform, width, height)."""

    def __init__(self, scene):
        self.crs, self.transform = scene.crs, scene.transform
        self.width, self.height = scene.width, scene.height


def _rgb(band_names: Sequence[str]) -> tuple[int, int, int] | None:
    try:
        return tuple(band_names.index(b) for b in ("B04", "B03", "B02"))
    except ValueError:
        return None


def _discard_rows(y0: int, y1: int, mean: np.ndarray, std: np.ndarray | None) -> None:
    """The rows of a process that does not write (process 0 writes the outputs)."""
    del y0, y1, mean, std


class _SceneReader:
    """Rows of the padded tile grid from the opened inputs, normalised like the training data."""

    def __init__(self, remover, layout, s2, s1, prob, prob_path, *, changes: bool = False):
        self.remover, self.layout, self.s2, self.s1, self.prob, self.prob_path = (
            remover, layout, s2, s1, prob, prob_path)
        nodata = s2.nodata
        if nodata is not None and not (np.isfinite(nodata) and 0 <= nodata <= np.iinfo(np.uint16).max):
            log.warning("%s: nodata %s does not fit uint16; the output has no nodata", s2.path, nodata)
            nodata = None
        self.nodata = nodata
        # What the writer will take (`came_in`): the valid pixels (nodata goes there; they mask the change
        # mask) and, when a change mask is written (`changes`), what came in; kept from the reads so that no
        # row is read twice, and nothing where this process writes no outputs (only process 0 writes).
        writes = parallel.is_writer()
        self.changes = writes and changes
        self.kept_valid = _KeptRows() if writes and (nodata is not None or changes) else None
        self.kept_dn = _KeptRows() if self.changes else None
        # s2cloudless needs all 13 bands; otherwise (a given map, the RGBN score) only the model's are read.
        s2cloudless = prob is None and remover.cloud_score["kind"] == "s2cloudless"
        self.bands = contract.S2_BANDS if s2cloudless else tuple(remover.band_names)
        missing = [b for b in self.bands if b not in s2.bands]
        if missing and s2cloudless and missing == ["B10"] and "B10" not in remover.band_names:
            raise DataError(s2.path, "has no B10, which s2cloudless needs to compute the cloud probability: "
                                     "give --cloud-prob, or --fill-b10")
        # The SAR rows (a warp, most often) are read in a thread of their own beside the S2 rows, until exit.
        self._sar = None if s1 is None else ThreadPoolExecutor(1, thread_name_prefix="read_s1")

    def __enter__(self) -> _SceneReader:
        return self

    def __exit__(self, *exc) -> None:
        if self._sar is not None:
            self._sar.shutdown(cancel_futures=True)

    def came_in(self, y0: int, y1: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """What came in at rows [y0, y1) of the scene, taken from the kept reads (each row once): (uint16 DN
        of the model's bands as the output would hold them, with a change mask, else None; (rows, W) valid
        mask, where the output has nodata or a change mask, else None)."""
        return (None if self.kept_dn is None else self.kept_dn.take(y0, y1),
                None if self.kept_valid is None else self.kept_valid.take(y0, y1))

    def read_rows(self, y0: int, y1: int) -> dict[str, np.ndarray]:
        """Rows [y0, y1) of the padded grid: "s2_cloudy" (model bands), "cloud_prob", and with SAR "s1" and
        "s1_coverage". The S2 and cloud-probability datasets are read in the tiler's reading thread alone, and
        the S1 one in the reader's own SAR thread (a GDAL dataset is not to be read from two threads at once);
        the writing thread takes what it needs from `came_in`."""
        end = min(y1, self.layout.height)
        sar = None if self._sar is None else self._sar.submit(self._read_s1, y0, end)
        raw = self.s2.read(y0, end, self.bands)
        if not np.all(np.isfinite(raw)):
            raise DataError(self.s2.path, f"NaN or Inf values in rows {y0}..{end}")
        s2 = contract.normalize_s2(raw)
        valid = self.s2.valid(y0, end)
        s2[~valid] = 0.0
        if self.prob is None:
            prob = self.remover.compute_cloud_prob(s2, self.bands)
        else:
            prob = np.moveaxis(self.prob.read(window=Window(0, y0, self.prob.width, end - y0)), 0, -1)
            prob = contract.cloud_prob_from_uint8(prob) if prob.dtype == np.uint8 else prob.astype(np.float32)
            if not np.all(np.isfinite(prob)) or prob.min() < 0 or prob.max() > 1:
                raise DataError(self.prob_path, f"cloud probability outside [0, 1] in rows {y0}..{end}")
        model_bands = [self.bands.index(b) for b in self.remover.band_names]
        if model_bands != list(range(len(self.bands))):  # a full-band model reads just its bands: no copy
            s2 = s2[..., model_bands]
        rows = {"s2_cloudy": s2, "cloud_prob": prob}
        if self.kept_valid is not None:
            self.kept_valid.keep(y0, valid)
        if self.kept_dn is not None:  # exactly the DN the output holds for an unchanged valid pixel
            self.kept_dn.keep(y0, contract.denormalize_s2(rows["s2_cloudy"]))
        if sar is not None:
            rows.update(sar.result())
        return {k: pad_to(v, y1 - y0, self.layout.padded_width) for k, v in rows.items()}

    def _read_s1(self, y0: int, y1: int) -> dict[str, np.ndarray]:
        return {"s1": contract.normalize_s1_filled(self.s1.read(y0, y1)),
                "s1_coverage": self.s1.coverage(y0, y1)}


class _DatesReader:
    """Several dates' `_SceneReader`s as one: rows with the dates stacked date-major along the channels (as
    `CloudRemover.predict_tiles` takes them), and, for the writer, the least-cloudy composite of the dates'
    DN (what came in, for the change mask). A pixel counts as valid where every date is."""

    def __init__(self, readers: list[_SceneReader]):
        self.readers, self.nodata = readers, readers[0].nodata
        self.kept_prob = _KeptRows() if readers[0].changes else None  # (W, D) per row, for the composite
        # The later dates are read in threads beside the first date's, until exit (each date's rows are read
        # whole before the next rows are asked for, so no dataset is read from two threads at once).
        self._later = ThreadPoolExecutor(len(readers) - 1, thread_name_prefix="read_date")

    def __enter__(self) -> _DatesReader:
        return self

    def __exit__(self, *exc) -> None:
        self._later.shutdown(cancel_futures=True)

    def read_rows(self, y0: int, y1: int) -> dict[str, np.ndarray]:
        later = [self._later.submit(r.read_rows, y0, y1) for r in self.readers[1:]]
        dates = [self.readers[0].read_rows(y0, y1), *(f.result() for f in later)]
        rows = {k: np.concatenate([d[k] for d in dates], axis=-1) for k in ("s2_cloudy", "cloud_prob", "s1")
                if k in dates[0]}
        if "s1_coverage" in dates[0]:
            rows["s1_coverage"] = np.logical_and.reduce([d["s1_coverage"] for d in dates])
        if self.kept_prob is not None:
            self.kept_prob.keep(y0, rows["cloud_prob"][: min(y1, self.readers[0].layout.height) - y0])
        return rows

    def came_in(self, y0: int, y1: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        dn, valid = zip(*(r.came_in(y0, y1) for r in self.readers))
        valid = None if valid[0] is None else np.logical_and.reduce(valid)
        if dn[0] is None:
            return None, valid
        prob = self.kept_prob.take(y0, y1)  # (rows, W, D); the composite follows the flow's rule
        return references.least_cloudy_composite(np.stack(dn), np.moveaxis(prob, -1, 0)), valid


class _KeptRows:
    """Rows of the scene kept from the reading thread until the writing thread takes them, each once (the
    first read of a row is kept: tile rows overlap, and every read of a row gives the same values)."""

    def __init__(self):
        self._rows: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def keep(self, y0: int, rows: np.ndarray) -> None:
        """rows (n, ...): scene rows y0 .. y0 + n."""
        with self._lock:
            for i, row in enumerate(rows):
                self._rows.setdefault(y0 + i, row)

    def take(self, y0: int, y1: int) -> np.ndarray:
        with self._lock:
            return np.stack([self._rows.pop(y) for y in range(y0, y1)])


class _Writes:
    """What the tiler's blended rows become: DN with the input's nodata kept, the change mask, the std."""

    def __init__(self, writer, reader: _SceneReader):
        self.writer, self.reader = writer, reader

    def __call__(self, y0: int, y1: int, mean: np.ndarray, std: np.ndarray | None) -> None:
        dn = contract.denormalize_s2(mean)
        std = None if std is None else np.asarray(std, np.float32)  # the tiler's own rows: changed in place
        before, valid = self.reader.came_in(y0, y1)
        changed = None
        if before is not None:
            changed = np.any(np.abs(dn.astype(np.int32) - before.astype(np.int32)) > CHANGE_DN, axis=-1)
            changed &= valid
        if self.reader.nodata is not None:
            dn[~valid] = self.reader.nodata
            if std is not None:
                std[~valid] = np.nan
        self.writer.write_rows(y0, y1, dn, std, changed)


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crrf_jax.predict",
        description="Remove clouds from a Sentinel-2 scene of any size with an exported bundle.",
    )
    add = parser.add_argument
    add("--bundle", required=True, help="bundle directory (python -m crrf_jax.export)")
    add("--s2", required=True, action="append",
        help="Sentinel-2: .SAFE folder or .zip, band-file folder or stacked GeoTIFF (repeat once per date)")
    add("--s2-offset", type=float, default=None, help="DN offset of the S2 input (default: its metadata's)")
    add("--s2-units", choices=("auto", "dn", "reflectance"), default="auto", help="S2 values (default: auto)")
    add("--fill-b10", action="store_true", help="fill B10 (cirrus) for L2A products that lack it")
    add("--s1", default=None, action="append", help="Sentinel-1 VV/VH GeoTIFF, any grid (optional; per date)")
    add("--s1-units", choices=("auto", "db", "linear"), default="auto", help="S1 values (default: detected)")
    add("--cloud-prob", default=None, action="append",
        help="cloud probability GeoTIFF (default: s2cloudless; per date)")
    add("--out", required=True, help="output Cloud-Optimized GeoTIFF (uint16 DN)")
    add("--uncertainty", default=None, help="optional per-band std GeoTIFF (float32)")
    add("--quicklook", default=None, help="optional RGB quicklook PNG of the output")
    add("--change-mask", default=None, help="optional uint8 GeoTIFF: 1 where the model changed the pixel")
    add("--no-cog", action="store_true", help="plain tiled GeoTIFFs instead of Cloud-Optimized GeoTIFFs")
    add("--compress", choices=scene_outputs.COMPRESSIONS, default="deflate", help="output compression")
    add("--steps", type=int, default=None, help="Euler steps (default: the bundle's)")
    add("--samples", type=int, default=1, help="samples averaged (K > 1 gives a real std)")
    add("--guidance", type=float, default=None, help="CFG scale (default: the bundle's)")
    add("--seed", type=int, default=0)
    add("--tile", type=int, default=None, help="tile size in pixels (default: the bundle's)")
    add("--overlap", type=int, default=None, help="tile overlap in pixels")
    add("--batch-size", type=int, default=8, help="tiles per batch (over all devices)")
    add("--keep-clear", type=float, default=None, metavar="P",
        help="leave pixels whose cloud probability is below P exactly as they came in")
    add("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype override")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Values the parser's types cannot check: an error naming the flag (exit status 2)."""
    checks = [
        ("--steps", args.steps, args.steps is None or args.steps >= 1, "must be >= 1"),
        ("--samples", args.samples, args.samples >= 1, "must be >= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "must be >= 1"),
        ("--tile", args.tile, args.tile is None or args.tile >= 16, "must be >= 16 (a multiple of 16)"),
        ("--overlap", args.overlap, args.overlap is None or args.overlap >= 0, "must be >= 0"),
        ("--guidance", args.guidance, args.guidance is None or np.isfinite(args.guidance), "must be finite"),
        ("--keep-clear", args.keep_clear, args.keep_clear is None or 0 <= args.keep_clear <= 1,
         "must be a cloud probability in [0, 1]"),
        ("--s2-offset", args.s2_offset, args.s2_offset is None or 0 <= args.s2_offset <= 10000,
         "must be a DN offset in [0, 10000] (1000 for processing baseline 04.00 and later)"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            parser.error(f"{flag}={value}: {rule}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("crrf_jax").setLevel(logging.INFO)
    parallel.initialize_distributed()
    try:
        remover = CloudRemover.from_bundle(args.bundle, dtype=args.dtype)
        summary = predict_scene(
            remover, args.s2, args.s1, args.cloud_prob, out_path=args.out, uncertainty_path=args.uncertainty,
            quicklook_path=args.quicklook, change_mask_path=args.change_mask, s2_offset=args.s2_offset,
            s2_units=args.s2_units, fill_b10=args.fill_b10, s1_units=args.s1_units, cog=not args.no_cog,
            compress=args.compress,
            steps=args.steps, num_samples=args.samples, guidance_scale=args.guidance, seed=args.seed,
            tile_size=args.tile, overlap=args.overlap, batch_size=args.batch_size, keep_clear=args.keep_clear,
            progress=not args.quiet,
        )
    except (BundleError, DataError, FileNotFoundError, ValueError, rasterio.errors.RasterioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not parallel.is_writer():
        return 0
    print(f"wrote {args.out} ({summary['height']}x{summary['width']}, {summary['tiles']} tiles, "
          f"{summary['seconds']:.1f} s{'' if summary['use_sar'] else ', without SAR'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
