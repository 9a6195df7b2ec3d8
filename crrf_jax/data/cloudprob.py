"""s2cloudless cloud probability of the cloudy Sentinel-2 image: batched, parallel, cached on disk.

s2cloudless (Sentinel Hub's LightGBM pixel classifier; its model file ships inside the pip package, so this
runs offline) needs all 13 L1C bands as reflectance, which our normalised S2 (DN / 10000, clipped to [0, 1])
is. We keep the raw per-pixel probability (no smoothing, no threshold).

Cache layout, next to the dataset and mirroring it::

    <root>/<season>_cloudprob/cloudprob_<n>/<season>_cloudprob_<n>_p<k>.tif

single band, uint8 = round(probability * 255) (``contract.cloud_prob_to_uint8``; quantisation error <= 1/510;
a quarter of float32's size),
deflate-compressed, same size, CRS and transform as the cloudy S2 patch. Files are written to
``<name>.partial`` and renamed, so a file that exists is complete and an interrupted run resumes where it
stopped.

CLI::

    python -m crrf_jax.data.cloudprob --root /data/SEN12MSCR [--split all] [--workers 8]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window
from tqdm import tqdm

from crrf_jax.data import contract, sen12mscr
from crrf_jax.data.contract import DataError
from crrf_jax.data.sen12mscr import BadSampleLog, Triplet

logger = logging.getLogger(__name__)

_PARTIAL = ".partial"


# ------------------------------------------------------------------------------------------------ computation


@functools.lru_cache(maxsize=1)
def _detector():
    from s2cloudless import S2PixelCloudDetector  # imports lightgbm and cv2: only when needed

    # threshold / average_over / dilation_size only affect masks, not the probability maps we use.
    return S2PixelCloudDetector(threshold=0.4, all_bands=True, average_over=4, dilation_size=2)


def cloud_probability(s2_cloudy: np.ndarray, num_threads: int = 0) -> np.ndarray:
    """Per-pixel cloud probability.

    Args:
      s2_cloudy: (B, H, W, 13) reflectance in [0, 1] (normalised S2, all 13 bands in file order).
      num_threads: LightGBM threads (0: its default, all cores).
    Returns (B, H, W, 1) float32 in [0, 1].
    """
    x = np.asarray(s2_cloudy, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != len(contract.S2_BANDS):
        raise ValueError(
            f"cloud_probability needs (B, H, W, 13) with all 13 Sentinel-2 bands "
            f"({', '.join(contract.S2_BANDS)}); got shape {x.shape}. s2cloudless cannot run on a band "
            "subset: read the cloudy image with bands=None."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("cloud_probability: input contains NaN or Inf")
    kwargs = {"num_threads": num_threads} if num_threads else {}
    prob = _detector().get_cloud_probability_maps(np.clip(x, 0.0, 1.0), **kwargs)
    return np.clip(prob, 0.0, 1.0).astype(np.float32)[..., None]


def _probabilities_of(images: list[np.ndarray], num_threads: int = 0) -> list[np.ndarray]:
    """Cloud probability of images of any sizes in one classifier call (it works pixel by pixel)."""
    pixels = np.concatenate([im.reshape(-1, im.shape[-1]) for im in images])
    prob = cloud_probability(pixels[None, :, None, :], num_threads)[0, :, 0]
    out, start = [], 0
    for im in images:
        n = im.shape[0] * im.shape[1]
        out.append(prob[start : start + n].reshape(im.shape[0], im.shape[1], 1))
        start += n
    return out


# ------------------------------------------------------------------------------------------------ cache files


def cloud_prob_path(root: str | os.PathLike, triplet: Triplet) -> Path:
    """Cache file of triplet: <root>/<season>_cloudprob/cloudprob_<n>/<season>_cloudprob_<n>_p<k>.tif."""
    season, n, k = triplet.season, triplet.scene, triplet.patch
    return Path(root) / f"{season}_cloudprob" / f"cloudprob_{n}" / f"{season}_cloudprob_{n}_p{k}.tif"


def write_cloud_prob(path: str | os.PathLike, prob: np.ndarray, crs, transform) -> None:
    """Atomically write prob (H, W, 1) or (H, W) in [0, 1] as a uint8 GeoTIFF (x255) with crs/transform."""
    path = Path(path)
    prob = np.asarray(prob, dtype=np.float32).reshape(prob.shape[0], prob.shape[1])
    data = contract.cloud_prob_to_uint8(prob)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + _PARTIAL)
    profile = dict(
        driver="GTiff",
        height=data.shape[0],
        width=data.shape[1],
        count=1,
        dtype="uint8",
        crs=crs,
        transform=transform,
        compress="deflate",
    )
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data, 1)
        dst.update_tags(1, meaning="s2cloudless cloud probability", scale=f"1/{contract.CLOUD_PROB_SCALE:g}")
    os.replace(tmp, path)


def load_cloud_prob(
    root: str | os.PathLike, triplet: Triplet, window: Window | None = None, *, compact: bool = False
) -> np.ndarray:
    """Cached cloud probability of triplet (H, W, 1) float32 in [0, 1], of window when given; with compact the
    stored uint8 x 255 (`contract.cloud_prob_from_uint8` makes it float32).

    Raises FileNotFoundError with the command that computes the cache when it is missing, DataError when the
    file is unreadable or not a single-band uint8 raster.
    """
    path = cloud_prob_path(root, triplet)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: cloud probability of {triplet.id} not computed; run "
            f"`python -m crrf_jax.data.cloudprob --root {root}` first"
        )
    with rasterio.Env(**contract.GDAL_ENV), contextlib.ExitStack() as stack:
        ds = contract.open_geotiff(path, stack, "cached cloud probability", count=1, dtypes=("uint8",))
        if window is not None:
            window = sen12mscr.check_window(window, ds.height, ds.width)
        try:
            data = ds.read(1, window=window)
        except rasterio.errors.RasterioError as e:
            raise DataError(path, f"cannot read cached cloud probability ({e})") from e
    return data[..., None] if compact else contract.cloud_prob_from_uint8(data)[..., None]


# -------------------------------------------------------------------------------------------------- batch job


@dataclasses.dataclass
class CloudProbReport:
    computed: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, reason)


def _process_batch(
    root: str, batch: list[Triplet], num_threads: int
) -> tuple[int, list[tuple[str, str, str]]]:
    """Compute and write the cache of a batch. Returns (written, [(id, file, reason) of bad samples])."""
    images, metas, bad = [], [], []
    for t in batch:
        try:
            cloudy = sen12mscr.read_s2_file(t.s2_cloudy)
        except DataError as e:
            bad.append((t.id, e.path, e.reason))
            continue
        images.append(cloudy["s2"])
        metas.append((t, cloudy["crs"], cloudy["transform"]))
    if images:
        for prob, (t, crs, transform) in zip(_probabilities_of(images, num_threads), metas, strict=True):
            write_cloud_prob(cloud_prob_path(root, t), prob, crs, transform)
    return len(images), bad


def compute_cloud_probs(
    root: str | os.PathLike,
    triplets: Sequence[Triplet] | None = None,
    *,
    split: str = "all",
    protocol: str = "exact",
    workers: int | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    on_error: str = "raise",
    bad_samples: BadSampleLog | None = None,
    progress: bool = True,
) -> CloudProbReport:
    """Compute the cloud-probability cache of triplets (default: ``find_triplets(root, split, protocol)``).

    Files that exist are skipped unless overwrite. Work is split into batches of batch_size patches, run in
    ``workers`` processes (default: CPU count; 0 or 1: in this process). A bad cloudy file raises DataError
    (``on_error="raise"``) or is skipped, recorded in bad_samples and in the report (``"skip"``); with
    "raise", batches already written stay, so a rerun resumes.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(root)
    if triplets is None:
        triplets = sen12mscr.find_triplets(root, split, protocol)
    workers = (os.cpu_count() or 1) if workers is None else workers
    report = CloudProbReport()
    todo = [t for t in triplets if overwrite or not cloud_prob_path(root, t).is_file()]
    report.skipped_existing = len(triplets) - len(todo)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="cloud probability", unit="patch", disable=not progress)

    def collect(size: int, written: int, bad: list[tuple[str, str, str]]) -> None:
        report.computed += written
        for sample_id, path, reason in bad:
            report.failed.append((path, reason))
            if on_error == "raise":
                raise DataError(path, reason)
            log = bad_samples if bad_samples is not None else BadSampleLog(logger)
            log.record(sample_id, DataError(path, reason))
        bar.update(size)

    try:
        if workers <= 1 or len(batches) <= 1:
            for batch in batches:
                collect(len(batch), *_process_batch(str(root), batch, 0))
        else:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX/XLA threads
            with ProcessPoolExecutor(max_workers=min(workers, len(batches)), mp_context=ctx) as pool:
                futures = {pool.submit(_process_batch, str(root), b, 1): len(b) for b in batches}
                try:
                    for fut in as_completed(futures):
                        collect(futures[fut], *fut.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    logger.info(
        "cloud probability: %d computed, %d already cached, %d failed",
        report.computed,
        report.skipped_existing,
        len(report.failed),
    )
    return report


# -------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crrf_jax.data.cloudprob",
        description="Precompute the s2cloudless cloud-probability cache of a SEN12MS-CR copy (resumable).",
    )
    parser.add_argument("--root", required=True, help="SEN12MS-CR root (holds ROIs1158_spring_s1, ...)")
    parser.add_argument("--split", default="all", choices=sen12mscr.SPLITS)
    parser.add_argument("--protocol", default="exact", choices=sen12mscr.PROTOCOLS)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--overwrite", action="store_true", help="recompute files that exist")
    parser.add_argument(
        "--skip-bad", action="store_true", help="log and skip bad cloudy files instead of failing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = compute_cloud_probs(
            args.root,
            split=args.split,
            protocol=args.protocol,
            workers=args.workers,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            on_error="skip" if args.skip_bad else "raise",
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"computed {report.computed}, already cached {report.skipped_existing}, failed {len(report.failed)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
