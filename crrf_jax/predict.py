"""Cloud removal on a user's GeoTIFF scene of any size, keeping its georeferencing.

    python -m crrf_jax.predict --bundle=B --s2=cloudy.tif [--s1=sar.tif] [--cloud-prob=p.tif]
        --out=clear.tif [--uncertainty=std.tif] [--steps N] [--samples K] [--guidance S] [--seed 0]
        [--tile 256 --overlap 32] [--keep-clear 0.2]

Inputs (checked, errors name the file):
  --s2          Sentinel-2 L1C, 13 bands in SEN12MS-CR order (B01..B08, B8A, B09..B12), uint16 DN (float DN
                accepted); pixels equal to the file's nodata in every band stay nodata in the output.
  --s1          Sentinel-1 VV, VH backscatter in dB, float32, 2 bands, on the S2 grid (same CRS, transform and
                size). Without it the model runs its degraded SAR-absent mode (a warning says so).
  --cloud-prob  s2cloudless probability on the S2 grid: 1 band, uint8 (x255, crrf_jax.data.cloudprob's cache)
                or float in [0, 1]. Computed with s2cloudless when absent.
The S1 and cloud-probability files must lie on the S2 file's grid to a thousandth of a pixel
(`crrf_jax.data.contract.check_same_grid`, shared with the dataset reader).
Outputs: `--out` with the model's bands (13 for a full model) as uint16 DN (reflectance x 10000), named by
band descriptions, and the input's CRS, transform, size and nodata; `--uncertainty` the per-band standard
deviation over the K samples, float32 reflectance. With `--keep-clear P`, pixels whose cloud probability is
below P are written exactly as they came in (same DN, std 0). Files are written as `<name>.partial` and renamed when
complete. The scene is processed one row of tiles at a time, so memory stays bounded on large scenes.

Several processes (jax.distributed; JAX_COORDINATOR_ADDRESS etc. in the environment, as for train.py) predict
one scene together: every process reads the inputs and runs the same tile batches, each on its own devices'
share of the tiles, and process 0 alone writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from crrf_jax import parallel
from crrf_jax.bundle import BundleError
from crrf_jax.data import contract
from crrf_jax.data.contract import DataError
from crrf_jax.inference import CloudRemover
from crrf_jax.tiling import TileLayout, pad_to

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------------------


def _band_name(description: str | None) -> str | None:
    """'B1', 'b01', 'B8a' -> 'B01', 'B01', 'B8A'; None for descriptions that are not band names."""
    m = re.fullmatch(r"B0?(\d{1,2})(A?)", (description or "").strip().upper())
    return f"B{int(m.group(1)):02d}{m.group(2)}".replace("B08A", "B8A") if m else None


def _check_s2_order(ds, path: Path) -> None:
    """When every band is described by a band name, they must be SEN12MS-CR's order."""
    names = [_band_name(d) for d in ds.descriptions]
    if all(names) and tuple(names) != contract.S2_BANDS:
        raise DataError(
            path,
            f"bands are described as {', '.join(names)}; expected SEN12MS-CR order "
            f"{', '.join(contract.S2_BANDS)}",
        )


# ------------------------------------------------------------------------------------------------------------
# Scene prediction
# ------------------------------------------------------------------------------------------------------------


def predict_scene(
    remover: CloudRemover,
    s2_path: str | os.PathLike,
    s1_path: str | os.PathLike | None = None,
    cloud_prob_path: str | os.PathLike | None = None,
    *,
    out_path: str | os.PathLike,
    uncertainty_path: str | os.PathLike | None = None,
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
    """Removes clouds from the GeoTIFF scene `s2_path` and writes `out_path` (and `uncertainty_path`).

    See the module docstring for the file contract; the arguments after the paths are those of
    `CloudRemover.remove_clouds`. Returns a summary (size, tiles, seconds, use_sar). Raises DataError naming
    the file for bad inputs. Existing outputs are replaced; on failure no output (or partial file) is left.
    With several processes every process calls it alike; process 0 writes the files.
    """
    s2_path, out_path = Path(s2_path), Path(out_path)
    s1_path = Path(s1_path) if s1_path else None
    cloud_prob_path = Path(cloud_prob_path) if cloud_prob_path else None
    uncertainty_path = Path(uncertainty_path) if uncertainty_path else None
    inputs = {p.resolve() for p in (s2_path, s1_path, cloud_prob_path) if p is not None}
    for out in (out_path, uncertainty_path):
        if out is not None and out.resolve() in inputs:
            raise ValueError(f"{out}: output path is also an input")
    tile, overlap = remover.check_tiling(tile_size, overlap)
    start = time.perf_counter()
    writer = None
    try:
        with rasterio.Env(**contract.GDAL_ENV), contextlib.ExitStack() as stack:
            s2, s1, prob = _open_inputs(stack, s2_path, s1_path, cloud_prob_path)
            use_sar = remover.use_sar(s1 is not None)
            layout = TileLayout(s2.height, s2.width, tile, overlap)
            reader = _SceneReader(remover, layout, s2, s2_path, s1 if use_sar else None, s1_path, prob,
                                  cloud_prob_path)
            if parallel.is_writer():
                writer = _SceneWriter(stack, s2, remover.band_names, out_path, uncertainty_path,
                                      reader.nodata)
            write = writer.write_rows if writer is not None else _discard_rows
            remover.process(layout, reader.read_rows, write, steps=steps, num_samples=num_samples,
                            guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                            keep_clear=keep_clear, progress=progress and writer is not None)
            if writer is not None:
                writer.tag(steps=steps or remover.config["sampling"]["steps"], samples=num_samples, seed=seed,
                           use_sar=use_sar, tile=tile, overlap=overlap, keep_clear=keep_clear)
    except BaseException:
        for path in (out_path, uncertainty_path):
            if path is not None and parallel.is_writer():
                _partial(path).unlink(missing_ok=True)
        raise
    if writer is not None:
        writer.commit()
    return {"height": layout.height, "width": layout.width, "tiles": layout.num_tiles, "use_sar": use_sar,
            "seconds": time.perf_counter() - start}


def _discard_rows(y0: int, y1: int, mean: np.ndarray, std: np.ndarray) -> None:
    """The rows of a process that does not write (process 0 writes the outputs)."""
    del y0, y1, mean, std


def _open_inputs(stack, s2_path: Path, s1_path: Path | None, prob_path: Path | None):
    """The open (s2, s1 or None, cloud probability or None) datasets, checked."""
    s2 = contract.open_geotiff(s2_path, stack, "Sentinel-2", count=len(contract.S2_BANDS),
                               dtypes=contract.S2_DTYPES)
    _check_s2_order(s2, s2_path)
    s1 = prob = None
    if s1_path is not None:
        s1 = contract.open_geotiff(s1_path, stack, "Sentinel-1", count=len(contract.S1_BANDS),
                                   dtypes=contract.S1_DTYPES, grid_of=(s2, s2_path))
    if prob_path is not None:
        prob = contract.open_geotiff(prob_path, stack, "cloud probability", count=1,
                                     dtypes=contract.CLOUD_PROB_DTYPES, grid_of=(s2, s2_path))
    return s2, s1, prob


class _SceneReader:
    """Rows of the padded tile grid from the open input files, normalised like the training data."""

    def __init__(self, remover, layout, s2, s2_path, s1, s1_path, prob, prob_path):
        self.remover, self.layout = remover, layout
        self.s2, self.s2_path, self.s1, self.s1_path, self.prob, self.prob_path = (
            s2, s2_path, s1, s1_path, prob, prob_path
        )
        nodata = s2.nodata
        if nodata is not None and not (np.isfinite(nodata) and 0 <= nodata <= np.iinfo(np.uint16).max):
            log.warning("%s: nodata %s does not fit uint16; the output has no nodata", s2_path, nodata)
            nodata = None
        self.nodata = nodata

    def _read(self, ds, path: Path, y0: int, y1: int) -> np.ndarray:
        window = Window(0, y0, ds.width, y1 - y0)
        try:
            return np.moveaxis(ds.read(window=window), 0, -1)
        except rasterio.errors.RasterioError as e:
            raise DataError(path, f"cannot read rows {y0}..{y1} (truncated or corrupt file?) ({e})") from e

    def read_rows(self, y0: int, y1: int) -> dict[str, np.ndarray]:
        """Rows [y0, y1) of the padded grid: "s2_cloudy" (model bands), "cloud_prob", and "s1" if used."""
        end = min(y1, self.layout.height)
        raw = self._read(self.s2, self.s2_path, y0, end).astype(np.float32)
        if not np.all(np.isfinite(raw)):
            raise DataError(self.s2_path, f"NaN or Inf values in rows {y0}..{end}")
        s2 = contract.normalize_s2(raw)
        if self.nodata is not None:
            s2[np.all(raw == self.nodata, axis=-1)] = 0.0
        if self.prob is None:
            from crrf_jax.data import cloudprob

            prob = cloudprob.cloud_probability(s2[None])[0]
        else:
            prob = self._read(self.prob, self.prob_path, y0, end)
            prob = contract.cloud_prob_from_uint8(prob) if prob.dtype == np.uint8 else prob.astype(np.float32)
            if not np.all(np.isfinite(prob)) or prob.min() < 0 or prob.max() > 1:
                raise DataError(self.prob_path, f"cloud probability outside [0, 1] in rows {y0}..{end}")
        rows = {"s2_cloudy": s2[..., list(self.remover.band_indices)], "cloud_prob": prob}
        if self.s1 is not None:
            db = self._read(self.s1, self.s1_path, y0, end).astype(np.float32)
            bad = ~np.isfinite(db)
            if bad.any():
                log.info("%s: %d non-finite values filled with -25 dB", self.s1_path, int(bad.sum()))
            rows["s1"] = contract.normalize_s1_filled(db)
        return {k: pad_to(v, y1 - y0, self.layout.padded_width) for k, v in rows.items()}


class _SceneWriter:
    """The output GeoTIFFs, written row band by row band into `.partial` files."""

    def __init__(self, stack, src, band_names, out_path: Path, uncertainty_path: Path | None, nodata):
        self.src, self.nodata = src, nodata
        self.paths = [p for p in (out_path, uncertainty_path) if p is not None]
        base = dict(driver="GTiff", width=src.width, height=src.height, count=len(band_names), crs=src.crs,
                    transform=src.transform, compress="deflate", BIGTIFF="IF_SAFER")
        self.out = self._create(stack, out_path, dict(base, dtype="uint16", nodata=nodata), band_names)
        self.std = None
        if uncertainty_path is not None:
            profile = dict(base, dtype="float32", nodata=np.nan if nodata is not None else None)
            self.std = self._create(stack, uncertainty_path, profile, [f"{b} std" for b in band_names])

    @staticmethod
    def _create(stack, path: Path, profile, descriptions):
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = stack.enter_context(rasterio.open(_partial(path), "w", **profile))
        for i, name in enumerate(descriptions, start=1):
            ds.set_band_description(i, name)
        return ds

    def write_rows(self, y0: int, y1: int, mean: np.ndarray, std: np.ndarray) -> None:
        window = Window(0, y0, self.src.width, y1 - y0)
        dn = contract.denormalize_s2(mean)
        std = std.astype(np.float32)
        if self.nodata is not None:
            raw = np.moveaxis(self.src.read(window=window), 0, -1)
            empty = np.all(raw == self.nodata, axis=-1)
            dn[empty] = self.nodata
            std[empty] = np.nan
        self.out.write(np.moveaxis(dn, -1, 0), window=window)
        if self.std is not None:
            self.std.write(np.moveaxis(std, -1, 0), window=window)

    def tag(self, **tags) -> None:
        for ds in (self.out, self.std):
            if ds is not None:
                ds.update_tags(software="crrf-jax", **{k: str(v) for k, v in tags.items()})

    def commit(self) -> None:
        for path in self.paths:
            os.replace(_partial(path), path)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crrf_jax.predict",
        description="Remove clouds from a Sentinel-2 GeoTIFF scene of any size with an exported bundle.",
    )
    parser.add_argument("--bundle", required=True, help="bundle directory (python -m crrf_jax.export)")
    parser.add_argument("--s2", required=True, help="cloudy Sentinel-2 L1C GeoTIFF, 13 bands")
    parser.add_argument("--s1", default=None, help="Sentinel-1 VV/VH dB GeoTIFF on the S2 grid (optional)")
    parser.add_argument("--cloud-prob", default=None, help="cloud probability GeoTIFF (default: s2cloudless)")
    parser.add_argument("--out", required=True, help="output GeoTIFF (uint16 DN)")
    parser.add_argument("--uncertainty", default=None, help="optional per-band std GeoTIFF (float32)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the bundle's)")
    parser.add_argument("--samples", type=int, default=1, help="samples averaged (K > 1 gives a real std)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the bundle's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: the bundle's)")
    parser.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per batch (over all devices)")
    parser.add_argument("--keep-clear", type=float, default=None, metavar="P",
                        help="leave pixels whose cloud probability is below P exactly as they came in")
    parser.add_argument("--dtype", default=None, help="compute dtype override: float32 | bfloat16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("crrf_jax").setLevel(logging.INFO)
    parallel.initialize_distributed()
    try:
        remover = CloudRemover.from_bundle(args.bundle, dtype=args.dtype)
        summary = predict_scene(
            remover, args.s2, args.s1, args.cloud_prob, out_path=args.out, uncertainty_path=args.uncertainty,
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
