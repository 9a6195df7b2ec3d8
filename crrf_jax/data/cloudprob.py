"""Cloud probability of cloudy images: s2cloudless (13 Sentinel-2 bands; batched, parallel, cached on disk),
and a learning-free R, G, B, NIR cloud score for the 4-band benchmarks (`rgbn_cloud_score`).

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
import json
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


# ------------------------------------------------------------------------------------------ R, G, B, NIR score

# Fmask's fixed clear-sky line (Zhu & Woodcock 2012, "Basic test": HOT = blue - 0.5 red - 0.08 > 0) and
# whiteness limit (< 0.7), and a brightness floor, with the soft widths that turn each test into a probability.
HOT_RED_SLOPE, HOT_OFFSET, HOT_WIDTH = 0.5, 0.08, 0.02
WHITENESS_MAX, WHITENESS_WIDTH = 0.7, 0.1
BRIGHTNESS_MIN, BRIGHTNESS_WIDTH = 0.2, 0.03


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def rgbn_cloud_score(rgbn: np.ndarray, reflectance_scale: float = 1.0) -> np.ndarray:
    """A learning-free cloud probability from R, G, B, NIR: soft Fmask brightness + whiteness + HOT tests.

    Why this one: s2cloudless needs 10 specific Sentinel-2 bands and the 4-band benchmarks (CUHK-CR, Sen2_MTC_New)
    have R, G, B and NIR only, so no trained detector applies. Of the learning-free tests that need no SWIR or
    thermal band, we take the three of Fmask (Zhu & Woodcock 2012) that clouds pass and most land fails:

    - the haze optimized transform, HOT = B - 0.5 R - 0.08 (Zhang et al. 2002, with Fmask's fixed clear-sky
      line instead of a per-scene regression, which needs clear pixels to fit and fails on overcast images):
      clouds and haze scatter blue more than the clear-sky line of land predicts;
    - whiteness, sum |band - mean| / mean over R, G, B < 0.7: clouds are grey, land and water coloured;
    - a brightness floor (mean of R, G, B above 0.2): dark grey surfaces (roads, shadows) pass whiteness.

    Each test becomes a logistic of its margin (widths 0.02, 0.1 and 0.03 reflectance), and the score is their
    product, so a pixel is cloudy only where all three agree. NIR is read but not scored: without SWIR, clouds
    and snow have the same R, G, B, NIR signature, and snow (like bright white roofs) scores as cloud, a known
    limit of any 4-band test (Fmask separates them with SWIR). The score is computed per pixel, so it is the
    same for a crop of an image as for the whole.

    Args:
      rgbn: (..., 4) R, G, B, NIR on [0, 1] (any leading shape: one image, dates, a batch).
      reflectance_scale: top-of-atmosphere reflectance of a value of 1 (Sen2_MTC_New, DN / 10000: 1; the 8-bit
        CUHK-CR images: see `crrf_jax.data.sources.CUHK_REFLECTANCE_SCALE`).
    Returns (..., 1) float32 in [0, 1].
    """
    x = np.asarray(rgbn, np.float32)
    if x.shape[-1] != 4:
        raise ValueError(f"rgbn_cloud_score needs (..., 4) R, G, B, NIR; got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("rgbn_cloud_score: input contains NaN or Inf")
    x = np.clip(x, 0.0, 1.0) * np.float32(reflectance_scale)
    red, green, blue = x[..., 0], x[..., 1], x[..., 2]
    mean = (red + green + blue) / 3
    whiteness = (np.abs(red - mean) + np.abs(green - mean) + np.abs(blue - mean)) / np.maximum(mean, 1e-3)
    hot = blue - HOT_RED_SLOPE * red - HOT_OFFSET
    score = (_sigmoid(hot / HOT_WIDTH) * _sigmoid((WHITENESS_MAX - whiteness) / WHITENESS_WIDTH)
             * _sigmoid((mean - BRIGHTNESS_MIN) / BRIGHTNESS_WIDTH))
    return np.clip(score, 0.0, 1.0).astype(np.float32)[..., None]


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


# ------------------------------------------------------------------------------- SEN12MS-CR-TS date coverage

TS_COVERAGE_FILE = "sen12mscr_ts_coverage.json"


def ts_coverage_path(cache_dir: str | os.PathLike) -> Path:
    """The SEN12MS-CR-TS coverage cache: one JSON file {series id: [coverage of each date]} under cache_dir."""
    return Path(cache_dir) / TS_COVERAGE_FILE


def ts_cloud_prob_path(cache_dir: str | os.PathLike, s2_path: str | os.PathLike) -> Path:
    """The cached cloud probability of one SEN12MS-CR-TS S2 file <region>/<n>/S2/<t>/s2_<rest>: the same path
    under cache_dir with folder CLOUDPROB and prefix cloudprob_ (uint8 x 255, the S2 file's grid)."""
    s2_path = Path(s2_path)
    t_dir, roi_dir = s2_path.parent, s2_path.parent.parent.parent
    name = "cloudprob_" + s2_path.name.removeprefix("s2_")
    return Path(cache_dir) / roi_dir.parent.name / roi_dir.name / "CLOUDPROB" / t_dir.name / name


def load_ts_coverage(cache_dir: str | os.PathLike) -> dict[str, list[float]]:
    """The cached coverages ({} when there is no cache yet); DataError naming the file when it is not JSON."""
    path = ts_coverage_path(cache_dir)
    if not path.is_file():
        return {}
    try:
        return {str(k): [float(c) for c in v] for k, v in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise DataError(path, f"not a SEN12MS-CR-TS coverage cache ({e}); delete it to recompute") from e


def load_ts_cloud_prob(cache_dir: str | os.PathLike, s2_path: str | os.PathLike) -> np.ndarray | None:
    """The cached (H, W, 1) float32 cloud probability of an S2 file, or None when it is not cached."""
    path = ts_cloud_prob_path(cache_dir, s2_path)
    if not path.is_file():
        return None
    with rasterio.Env(**contract.GDAL_ENV), contextlib.ExitStack() as stack:
        ds = contract.open_geotiff(path, stack, "cached cloud probability", count=1, dtypes=("uint8",))
        try:
            return contract.cloud_prob_from_uint8(ds.read(1))[..., None]
        except rasterio.errors.RasterioError as e:
            raise DataError(path, f"cannot read cached cloud probability ({e})") from e


def _ts_series_cache(cache_dir: str, series) -> tuple[str, list[float]]:
    """Writes the cloud probability of every date of a series and returns (id, coverage of each date):
    UnCRtainTS's s2cloudless mask fraction (`sen12mscr_ts.cloud_coverage`), from the same probabilities."""
    coverage = []
    for path in series.s2:
        cloudy = sen12mscr.read_s2_file(path)
        x = cloudy["s2"]
        prob = _detector().get_cloud_probability_maps(x[None])  # float64, as s2cloudless's own masks use
        write_cloud_prob(ts_cloud_prob_path(cache_dir, path), np.clip(prob[0], 0.0, 1.0), cloudy["crs"],
                         cloudy["transform"])
        blank = x.mean() * contract.S2_DN_MAX < 1e-5 and x.std() * contract.S2_DN_MAX < 1e-5
        coverage.append(1.0 if blank else float(np.mean(_detector().get_mask_from_prob(prob)[0])))
    return series.id, coverage


def compute_ts_coverage(root: str | os.PathLike, series=None, cache_dir: str | os.PathLike | None = None, *,
                        workers: int = 0, progress: bool = True) -> dict[str, list[float]]:
    """Caches the s2cloudless probability of every date of every SEN12MS-CR-TS series (default: all under
    root) and the dates' cloud coverage; returns the coverage cache.

    The coverage (UnCRtainTS's s2cloudless mask fraction, equal to `sen12mscr_ts.cloud_coverage`) is what its
    date samplers choose by: a series needs it for all of its (up to 30) dates before any sample is drawn.
    The probability maps are the inputs' cloud_prob. Both cost seconds a date on a CPU, so they are computed
    once, here: maps as uint8 GeoTIFFs (`ts_cloud_prob_path`), coverage in one JSON file
    (`ts_coverage_path`, rewritten whole through a temporary). Series already in the JSON file are skipped.
    `workers` > 1: that many processes.
    """
    from crrf_jax.data import sen12mscr_ts

    cache_dir = Path(root if cache_dir is None else cache_dir)
    series = sen12mscr_ts.find_series(root, "all") if series is None else series
    cache = load_ts_coverage(cache_dir)
    todo = [s for s in series if len(cache.get(s.id, ())) != len(s)]
    bar = tqdm(total=len(todo), desc="date cloud probability", unit="series", disable=not progress)

    def save() -> None:
        path = ts_coverage_path(cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + _PARTIAL)
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, path)

    try:
        if workers <= 1:
            for s in todo:
                sid, coverage = _ts_series_cache(str(cache_dir), s)
                cache[sid] = coverage
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX/XLA threads
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for fut in as_completed([pool.submit(_ts_series_cache, str(cache_dir), s) for s in todo]):
                    sid, coverage = fut.result()
                    cache[sid] = coverage
                    bar.update(1)
    finally:
        bar.close()
        if todo:
            save()  # what was computed stays, so an interrupted run resumes
    logger.info("SEN12MS-CR-TS cloud probability: %d series computed, %d cached", len(todo),
                len(series) - len(todo))
    return cache


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
