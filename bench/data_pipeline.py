"""Input-pipeline throughput on synthetic SEN12MS-CR patches: raw rasterio reads vs the grain pipelines.

    python bench/data_pipeline.py [--n 96] [--size 256] [--batch 8] [--work DIR] [--write]

Measures patches/s, after a warm-up pass (files in the page cache), for
- raw: rasterio reading the four GeoTIFFs of a patch (s1, s2, s2_cloudy, cached cloud probability) into
  numpy as stored, nothing else: the limit of the GeoTIFF route;
- samples: a plain loop of read_triplet + load_cloud_prob (what the GeoTIFF source does per patch);
- geotiff: `make_dataset(source="geotiff")`: read_triplet (validation, float32 [0, 1]), cloud probability,
  shuffle, flips/rotations, batching;
- arrayrecord: `make_dataset(source="tfds")`: the same over the TFDS ArrayRecord shards;
each in this process (0) and with 1 and 2 worker processes (loops: a process pool of that size). Rounds
interleave all measurements and the best of each is reported. `--write` puts the results into the
"Data pipeline" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # noqa: E402 (bench/report.py, beside this script)

from crrf_jax.data import cloudprob, contract, pipeline, sen12mscr, synthetic
from crrf_jax.data.tfds import build_tfds

_STATE: dict = {}


def _read_raw(index: int) -> int:
    """Reads the four files of patch `index` with rasterio as stored ((C, H, W) arrays); returns the bytes."""
    total = 0
    with rasterio.Env(**contract.GDAL_ENV):
        for path in _STATE["files"][index]:
            with rasterio.open(path) as f:
                total += f.read().nbytes
    return total


def _read_sample(index: int) -> int:
    """read_triplet + load_cloud_prob of patch `index` (validated, float32 (H, W, C) in [0, 1])."""
    return sum(v.nbytes for v in _STATE["source"][index].values() if isinstance(v, np.ndarray))


def _init(files: list[list[str]], root: str) -> None:
    _STATE.update(files=files, source=pipeline.GeoTiffSource(root, "train"))


def loop_rate(read, files: list[list[str]], root: Path, workers: int, repeats: int) -> float:
    """Patches/s of `read(index)` over `repeats` passes, in this process (0) or a pool of `workers`."""
    indices = list(range(len(files))) * repeats
    if workers == 0:
        _init(files, str(root))
        for index in range(len(files)):
            read(index)
        start = time.perf_counter()
        for index in indices:
            read(index)
        return len(indices) / (time.perf_counter() - start)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(files, str(root))) as pool:
        pool.map(read, range(len(files)), chunksize=4)  # warm-up: page cache, imports
        start = time.perf_counter()
        pool.map(read, indices, chunksize=4)
        return len(indices) / (time.perf_counter() - start)


def pipeline_rate(kwargs: dict, workers: int, batches: int) -> float:
    """Patches/s of a training pipeline over `batches` batches after a warm-up of a few batches."""
    iterator = iter(pipeline.make_dataset(**kwargs, worker_count=workers))
    for _ in range(max(3, workers * 2)):
        next(iterator)
    start = time.perf_counter()
    patches = 0
    for _ in range(batches):
        patches += len(next(iterator)["id"])
    rate = patches / (time.perf_counter() - start)
    iterator.close()
    return rate





def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=96, help="synthetic patches")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2, help="passes over the data per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best rate is reported")
    parser.add_argument("--work", default=None, help="folder for the data (kept; default: a temporary one)")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="crrf_bench_"))
    root, data_dir = work / "raw", work / "tfds"
    t0 = time.perf_counter()
    if not (root / "done").exists():
        layout = [("ROIs1868_summer", 36 + i) for i in range(4)]  # all train ROIs
        synthetic.write_synthetic_dataset(root, n_scenes=args.n, size=args.size, seed=0, layout=layout)
        build_tfds(root, data_dir, "exact", cloud_prob_workers=2)
        (root / "done").touch()
    print(f"data ready in {time.perf_counter() - t0:.0f} s under {work}")
    triplets = sen12mscr.find_triplets(root, "train")
    files = [
        [str(t.s1), str(t.s2), str(t.s2_cloudy), str(cloudprob.cloud_prob_path(root, t))] for t in triplets
    ]
    n = len(triplets)
    batches = max(4, args.passes * n // args.batch)
    common = dict(
        root=root,
        data_dir=data_dir,
        split="train",
        batch_size=args.batch,
        augment=True,
        shuffle=True,
        seed=0,
        process_index=0,
        process_count=1,
    )
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, int], float] = {}
    for round_ in range(args.rounds):  # interleaved rounds, best of each: less skew from other jobs
        for workers in (0, 1, 2):
            rates = {
                "raw": loop_rate(_read_raw, files, root, workers, args.passes),
                "samples": loop_rate(_read_sample, files, root, workers, args.passes),
                "geotiff": pipeline_rate({**common, "source": "geotiff"}, workers, batches),
                "arrayrecord": pipeline_rate({**common, "source": "tfds"}, workers, batches),
            }
            for name, rate in rates.items():
                results[(name, workers)] = max(rate, results.get((name, workers), 0.0))
            print(
                f"round {round_}, {workers} worker(s): " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
            )

    geo_vs_raw = {w: results[("geotiff", w)] / results[("raw", w)] for w in (0, 1, 2)}
    geo_vs_samples = {w: results[("geotiff", w)] / results[("samples", w)] for w in (0, 1, 2)}
    ar_vs_geo = {w: results[("arrayrecord", w)] / results[("geotiff", w)] for w in (0, 1, 2)}
    command = (
        f"python bench/data_pipeline.py --n {args.n} --size {args.size} --batch {args.batch} "
        f"--passes {args.passes} --rounds {args.rounds} --write"
    )
    rows = "\n".join(
        f"| {label} | {results[(key, 0)]:.1f} | {results[(key, 1)]:.1f} | {results[(key, 2)]:.1f} |"
        for key, label in (
            ("raw", "raw rasterio reads of the 4 GeoTIFFs (the limit)"),
            ("samples", "loop of read_triplet + load_cloud_prob (no pipeline)"),
            ("geotiff", 'GeoTIFF pipeline (`source="geotiff"`)'),
            ("arrayrecord", 'ArrayRecord pipeline (`source="tfds"`)'),
        )
    )

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    text = f"""## Data pipeline

Command: `{command}`
Machine: {report.machine(with_devices=False)}; load average {load_before:.1f} at the start
Date: {datetime.date.today().isoformat()}
Data: {n} synthetic {args.size}x{args.size} training patches (13-band S2 clear + cloudy, 2-band S1, cloud
probability), warm page cache; batches of {args.batch}, shuffle, flips and rotations, float32 output.

Patches per second, best of {args.rounds} interleaved rounds (0 = in the main process; raw and read_triplet
loops: a pool of that many processes; pipelines: grain worker processes):

| route | 0 workers | 1 worker | 2 workers |
| --- | ---: | ---: | ---: |
{rows}

Goals:
- GeoTIFF pipeline >= 80 % of the raw read rate: {geo_vs_raw[0]:.0%} in-process, {geo_vs_raw[1]:.0%} with 1
  worker, {geo_vs_raw[2]:.0%} with 2
  ({met(min(geo_vs_raw.values()) >= 0.8)}).
  The pipeline machinery itself (shuffle, augmentation, batching, workers) keeps
  {geo_vs_samples[0]:.0%} / {geo_vs_samples[1]:.0%} / {geo_vs_samples[2]:.0%} of the plain read_triplet loop;
  the rest of the gap to raw reads is read_triplet's own work (validation, (C, H, W) -> (H, W, C),
  uint16 -> float32 [0, 1]).
- ArrayRecord pipeline >= 5x the GeoTIFF pipeline: {ar_vs_geo[0]:.1f}x in-process, {ar_vs_geo[1]:.1f}x with 1
  worker, {ar_vs_geo[2]:.1f}x with 2 ({met(min(ar_vs_geo.values()) >= 5)}).

Where the time goes (separate micro-measurements on the same machine, same kind of load):
- Reading one 4 MB ArrayRecord record costs about 3 ms (the riegeli reader) against 0.5 ms for a plain
  `pread` of the same bytes; TFDS's default zstd records take 2-3 times longer again, so the builder writes
  uncompressed records (`compression="zstd"` is available: 40 % smaller on the real sample patches).
- The float32 contract itself costs about 2.5 ms a patch on the host (uint16 -> float32 of 2 x 13 bands); the
  TFDS route does it in one pass while batching.
- grain's shared memory costs about 10 ms a float32 patch (7.6 MB of fresh pages) on this VM, so with
  workers the TFDS route ships compact uint16/uint8 batches (4 MB a patch) and converts in the main process.
- The GeoTIFF route pays read_triplet's validation and conversions on top of the raw reads; its pipeline
  overhead over a plain read_triplet loop is the augmentation copy and the batching.
"""
    print(text)
    if args.write:
        report.write_section("Data pipeline", text)
        print(f"wrote the Data pipeline section of {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
