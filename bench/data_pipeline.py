"""Input-pipeline throughput on synthetic SEN12MS-CR patches: the grain pipelines against their read limits.

    python bench/data_pipeline.py [--n 96] [--size 256] [--batch 8] [--min_seconds 2] [--work DIR] [--write]

Measures patches/s, after a warm-up pass (files in the page cache), for
- raw: rasterio reading the four GeoTIFFs of a patch (s1, s2, s2_cloudy, cached cloud probability) into
  numpy as stored, nothing else: the limit of the GeoTIFF route;
- samples: a plain loop over the pipeline's GeoTIFF source (`open_source(..., decode=False)`: read_triplet
  with its checks + the cached cloud probability, in the form the pipeline batches);
- geotiff: `make_dataset(source="geotiff")`: that source, shuffle, flips/rotations, batching;
- plain: `os.pread` of the ArrayRecord shards' bytes, one record-sized read per patch in shuffled order (shard
  size / records: the records are uncompressed and alike), nothing else: the limit of the ArrayRecord route;
- records: the ArrayRecord reader alone (riegeli, through TFDS's data source), the record bytes undecoded;
- tfds_samples: a plain loop over the pipeline's TFDS source (`open_source("tfds", ..., decode=False)`);
- arrayrecord: `make_dataset(source="tfds")`: the TFDS ArrayRecord source, shuffle, flips/rotations, batching;
each in this process (0) and with 1 and 2 worker processes (loops: a process pool of that size). Rounds
interleave all measurements and the best of each is reported, with the CPU time a patch costs all the
processes of the route together (`cpu_seconds`: the work, without the time other guests held the cores). It
also times `contract.normalize_batch` on a batch inside jit (where the pipelines' compact batches become
float32; on this CPU the "device" is the CPU).
`--write` puts the results into the "Data pipeline" section of BENCHMARKS.md.

The script runs against older code too (it only uses `open_source` and `make_dataset`), which is how the
"before" figures of BENCHMARKS.md were measured: the same script and data on the previous commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # noqa: E402 (bench/report.py, beside this script)

from crrf_jax.data import cloudprob, contract, pipeline, sen12mscr, synthetic

try:
    from crrf_jax.data import sources
except ImportError:  # the code before the sources had a module of their own: the script measures it too
    sources = pipeline
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
    """The pipeline's GeoTIFF source on patch `index` (read_triplet + load_cloud_prob, validated)."""
    return sum(v.nbytes for v in _STATE["source"][index].values() if isinstance(v, np.ndarray))


def _read_record(index: int) -> int:
    """The record bytes of patch `index` from the ArrayRecord reader (riegeli), not decoded."""
    return len(_STATE["tfds"]._open().data_source[index])


def _read_tfds_sample(index: int) -> int:
    """The pipeline's TFDS source on patch `index` (the record read and decoded into its arrays)."""
    return sum(v.nbytes for v in _STATE["tfds"][index].values() if isinstance(v, np.ndarray))


def _read_plain(index: int) -> int:
    """One record-sized `os.pread` of the ArrayRecord shards (record `index` of a shuffled order)."""
    path, offset, size = _STATE["records"][index]
    fd = _STATE["fds"].get(path)
    if fd is None:
        fd = _STATE["fds"][path] = os.open(path, os.O_RDONLY)
    return len(os.pread(fd, size, offset))


def record_ranges(data_dir: Path, n: int) -> list[tuple[str, int, int]]:
    """(shard, offset, size) of n record-sized ranges of the train shards, in a seeded shuffled order."""
    shards = sorted(data_dir.glob("sen12mscr/exact/*/sen12mscr-train.array_record-*"))
    per_shard = -(-n // len(shards))
    ranges = []
    for shard in shards:
        size = shard.stat().st_size // per_shard
        ranges += [(str(shard), i * size, size) for i in range(per_shard)]
    order = np.random.default_rng(0).permutation(len(ranges))[:n]
    return [ranges[i] for i in order]


def _init(files: list[list[str]], root: str, records: list | None = None, data_dir: str | None = None) -> None:
    try:  # the loops read with the allocator settings the pipeline's reading processes use (old code: none)
        from crrf_jax.data import host_memory
    except ImportError:
        pass
    else:
        host_memory.keep_large_buffers()
    source = sources.open_source("geotiff", root=root, split="train", decode=False)
    tfds = sources.open_source("tfds", data_dir=data_dir, split="train", decode=False) if data_dir else None
    _STATE.update(files=files, source=source, records=records or [], fds={}, tfds=tfds)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live descendants (pool or grain worker processes),
    from Linux's /proc; NaN elsewhere. Unlike wall time it leaves out the time this VM's cores were taken
    by other guests (it still moves with their load: a shared physical core runs slower)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        entries = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return float("nan")
    children, cpu = {}, {}
    for pid in entries:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(pid))  # fields[1]: the parent
        cpu[int(pid)] = int(fields[11]) + int(fields[12])  # utime, stime
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0)
        todo += children.get(pid, [])
    return total / tick


def loop_rate(read, files: list[list[str]], root: Path, workers: int, repeats: int, records=None,
              data_dir: Path | None = None) -> tuple[float, float]:
    """(patches/s, CPU ms a patch) of `read(index)` over `repeats` passes, and more passes until
    `_STATE["min_seconds"]` have gone by, in this process (0) or a pool of `workers`."""
    indices = list(range(len(files))) * repeats
    data_dir = str(data_dir) if data_dir else None
    if workers == 0:
        _init(files, str(root), records, data_dir)
        for index in range(len(files)):
            read(index)

        def one_pass() -> int:
            for index in indices:
                read(index)
            return len(indices)

        return _timed(one_pass)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(files, str(root), records, data_dir)) as pool:
        pool.map(read, range(len(files)), chunksize=4)  # warm-up: page cache, imports
        return _timed(lambda: len(pool.map(read, indices, chunksize=4)))


def pipeline_rate(kwargs: dict, workers: int, batches: int) -> tuple[float, float]:
    """(patches/s, CPU ms a patch) of a training pipeline over `batches` batches, and more until
    `_STATE["min_seconds"]` have gone by, after a warm-up of a few batches."""
    iterator = iter(pipeline.make_dataset(**kwargs, worker_count=workers))
    for _ in range(max(3, workers * 2)):
        next(iterator)
    rates = _timed(lambda: sum(len(next(iterator)["id"]) for _ in range(batches)))
    iterator.close()
    return rates


def _timed(step) -> tuple[float, float]:
    """(patches/s, CPU ms a patch) over calls of `step` (each returns the patches it read) until at least
    `_STATE["min_seconds"]` have gone by: short windows (a pass over 64 patches is a few tenths of a second)
    let one slow moment of a shared VM decide a figure."""
    start, cpu = time.perf_counter(), cpu_seconds()
    patches = step()
    while time.perf_counter() - start < _STATE.get("min_seconds", 0.0):
        patches += step()
    return _rates(patches, start, cpu)


def _rates(patches: int, start: float, cpu: float) -> tuple[float, float]:
    return patches / (time.perf_counter() - start), (cpu_seconds() - cpu) / patches * 1e3


def handover_ms(kwargs: dict, repeats: int = 10) -> dict[str, float]:
    """Milliseconds to hand one pipeline batch from a worker to the main process, best of `repeats`, the
    writing side: "fresh" = grain's way, a new shared-memory segment per array (created, written, unlinked and
    closed); "slot" = `shm_slots`, the batch written into a reused slot (leased, written, released). Old code
    without shm_slots: fresh only."""
    from grain.python import SharedMemoryArray

    batch = next(iter(pipeline.make_dataset(**kwargs, worker_count=0)))
    arrays = [batch[k] for k in contract.ARRAY_KEYS]

    def fresh():
        for value in arrays:
            out = SharedMemoryArray(value.shape, value.dtype)
            np.copyto(out, value)
            out.unlink_on_del()
            del out

    def slot(pool):
        leased = pool.lease([(v.shape, v.dtype) for v in arrays])
        for value in arrays:
            np.copyto(leased.array(value.shape, value.dtype)[0], value)
        pool.flags[leased.index] = 0  # what the main process does when the batch is collected

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    out = {"fresh": best(fresh)}
    try:
        from crrf_jax.data import shm_slots
    except ImportError:
        return out
    pool = shm_slots.SlotPool(max_slots=1)
    out["slot"] = best(lambda: slot(pool))
    shm_slots._unlink_all(pool._made)
    return out


def normalize_ms(kwargs: dict, repeats: int = 5) -> tuple[float, str]:
    """Milliseconds of `contract.normalize_batch` inside jit on one pipeline batch (best of `repeats`), and
    the batch's dtypes. Old code without normalize_batch: (nan, dtypes)."""
    batch = next(iter(pipeline.make_dataset(**kwargs, worker_count=0)))
    arrays = {k: batch[k] for k in contract.ARRAY_KEYS}
    dtypes = ", ".join(f"{k} {v.dtype}" for k, v in arrays.items())
    pending = getattr(contract, "FLIP_ROTATE", None)
    if pending in batch:  # the flips and rotations the step applies too
        arrays[pending] = batch[pending]
    if not hasattr(contract, "normalize_batch"):
        return float("nan"), dtypes
    import jax

    step = jax.jit(contract.normalize_batch)
    jax.block_until_ready(step(arrays))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(arrays))
        best = min(best, time.perf_counter() - start)
    return best * 1e3, dtypes


def decode_ms(data_dir: Path, records: int = 16, repeats: int = 4) -> dict[str, float]:
    """Milliseconds a record of turning stored ArrayRecord bytes into the source's arrays, best of `repeats`
    passes over `records` records: the TFDS source's own parse (`TfdsSource._parse`), and protobuf's parser
    with `bytes_list.value[0]` for comparison (what TFDS's decoding, and this code before
    `crrf_jax.data.tf_example`, did)."""
    from tensorflow_datasets.proto import tf_example_pb2

    source = sources.open_source("tfds", data_dir=data_dir, split="train", decode=False)
    stored = [source._open().data_source[i] for i in range(min(records, len(source)))]

    def with_protobuf(record: bytes) -> None:
        feature = tf_example_pb2.Example.FromString(record).features.feature
        for key in contract.ARRAY_KEYS:
            np.frombuffer(feature[f"{key}/value"].bytes_list.value[0], np.uint8)

    def best(parse) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for index, record in enumerate(stored):
                parse(record, index)
            times.append((time.perf_counter() - start) / len(stored))
        return min(times) * 1e3

    return {"source": best(source._parse), "protobuf": best(lambda record, _: with_protobuf(record))}


def latent_feed(batch: int, size: int, wait_s: float = 5.0) -> dict[str, float]:
    """The flow stage's latent-cache iterator (`latent_cache.iterator`, its defaults) in a process of its own,
    so that the memory it holds is its own: ms and CPU ms a batch of `batch` crops of `size` pixels over a
    synthetic cache (bench/train_step.py's), best of 3 runs of 50 batches, and how much its resident memory
    grew (MB) after the consumer waited `wait_s` s: what it reads ahead (the cache's mapped pages
    included, `cache_mb`)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_latent_feed, (batch, size, wait_s))


def _latent_feed(batch: int, size: int, wait_s: float) -> dict[str, float]:
    from train_step import write_latent_cache  # bench/train_step.py, beside this script

    from crrf_jax import latent_cache

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_latent_cache(tmp, 8 * batch, size)
        cache_mb = sum(p.stat().st_size for p in Path(cache).glob("*.npy")) / 2**20
        start_mb = rss_mb()
        it = latent_cache.iterator(cache, batch_size=batch, crop_size=size, seed=0)
        next(it)
        best, best_cpu = float("inf"), float("inf")
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(50):
                next(it)
            best = min(best, (time.perf_counter() - t0) / 50 * 1e3)
            best_cpu = min(best_cpu, (time.process_time() - c0) / 50 * 1e3)
        time.sleep(wait_s)
        return {"ms": best, "cpu_ms": best_cpu, "rss_mb": rss_mb() - start_mb, "cache_mb": cache_mb,
                "batch": batch, "size": size, "wait_s": wait_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=96, help="synthetic patches")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2, help="passes over the data per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best rate is reported")
    parser.add_argument("--min_seconds", type=float, default=2.0,
                        help="each measurement runs whole passes (batches) until this long at least")
    parser.add_argument("--latent_batch", type=int, default=32,
                        help="batch of the latent-cache measurement (the flow stage's default batch)")
    parser.add_argument("--work", default=None, help="folder for the data (kept; default: a temporary one)")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    parser.add_argument("--json", default=None, help="also write this run's figures to this JSON file (an "
                        "existing one is merged into: the best of its runs and this one)")
    parser.add_argument("--before", default=None, help="a --json file of an earlier run, shown beside this one")
    parser.add_argument("--before_label", default="the code before the change",
                        help="what the --before run measured, in the report's words")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: print (and with --write write) the section of the --json file")
    args = parser.parse_args()
    if args.report:
        run = json.loads(Path(args.json).read_text())
        before = json.loads(Path(args.before).read_text()) if args.before else None
        text = section(run, before, _command(args), run["n"], args)
        print(text)
        if args.write:
            report.write_section("Data pipeline", text)
        return

    _STATE["min_seconds"] = args.min_seconds
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
    records = record_ranges(data_dir, n)
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
    results: dict[tuple[str, int], float] = {}  # patches/s, the best of the rounds
    cpu_ms: dict[tuple[str, int], float] = {}  # CPU ms a patch, the least of the rounds
    for round_ in range(args.rounds):  # interleaved rounds, best of each: less skew from other jobs
        for workers in (0, 1, 2):
            rates = {
                "raw": loop_rate(_read_raw, files, root, workers, args.passes),
                "samples": loop_rate(_read_sample, files, root, workers, args.passes),
                "geotiff": pipeline_rate({**common, "source": "geotiff"}, workers, batches),
                "plain": loop_rate(_read_plain, files, root, workers, args.passes, records),
                "records": loop_rate(_read_record, files, root, workers, args.passes, data_dir=data_dir),
                "tfds_samples": loop_rate(_read_tfds_sample, files, root, workers, args.passes, data_dir=data_dir),
                "arrayrecord": pipeline_rate({**common, "source": "tfds"}, workers, batches),
            }
            for name, (rate, cpu) in rates.items():
                results[(name, workers)] = max(rate, results.get((name, workers), 0.0))
                cpu_ms[(name, workers)] = min(cpu, cpu_ms.get((name, workers), float("inf")))
            print(f"round {round_}, {workers} worker(s): "
                  + ", ".join(f"{k} {v:.1f}/s ({c:.2f} CPU ms)" for k, (v, c) in rates.items()))

    norm_ms, dtypes = normalize_ms({**common, "source": "tfds"})
    handover = handover_ms({**common, "source": "tfds"})
    decode = decode_ms(data_dir)
    latent = latent_feed(args.latent_batch, args.size)
    load_after = os.getloadavg()[0]
    run = {"results": {f"{k}/{w}": v for (k, w), v in results.items()},
           "cpu_ms": {f"{k}/{w}": v for (k, w), v in cpu_ms.items()}, "normalize_ms": norm_ms,
           "handover_ms": handover, "decode_ms": decode, "latent_feed": latent, "dtypes": dtypes, "load": [load_before, load_after],
           "commit": _commit(), "n": n}
    if args.json:  # an existing file is merged into: best of its runs and this one (runs interleaved by hand)
        if Path(args.json).exists():
            old = json.loads(Path(args.json).read_text())
            run["results"] = {k: max(v, old["results"].get(k, 0.0)) for k, v in run["results"].items()}
            run["cpu_ms"] = {k: min(v, old.get("cpu_ms", {}).get(k, v)) for k, v in run["cpu_ms"].items()}
            run["load"] = [min(old["load"][0], load_before), max(old["load"][1], load_after)]
            run["runs"] = old.get("runs", 1) + 1
            for key in ("handover_ms", "decode_ms", "latent_feed"):  # times: the least of the runs
                kept = old.get(key, {})
                run[key] = {k: min(v, kept.get(k, v)) for k, v in run[key].items()}
        Path(args.json).write_text(json.dumps(run, indent=2))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    text = section(run, before, _command(args), n, args)
    print(text)
    if args.write:
        report.write_section("Data pipeline", text)
        print(f"wrote the Data pipeline section of {REPO / 'BENCHMARKS.md'}")


def _command(args) -> str:
    return (f"python bench/data_pipeline.py --n {args.n} --size {args.size} --batch {args.batch} "
            f"--passes {args.passes} --rounds {args.rounds} --min_seconds {args.min_seconds:g}")


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() or "unknown"


ROUTES = (
    ("raw", "raw rasterio reads of the 4 GeoTIFFs (the GeoTIFF limit)"),
    ("samples", "loop over the pipeline's GeoTIFF source (no pipeline)"),
    ("geotiff", 'GeoTIFF pipeline (`source="geotiff"`)'),
    ("plain", "plain `pread` of the ArrayRecord bytes (the ArrayRecord limit)"),
    ("records", "ArrayRecord reader alone (riegeli, record bytes undecoded)"),
    ("tfds_samples", "loop over the pipeline's TFDS source (read + decode, no pipeline)"),
    ("arrayrecord", 'ArrayRecord pipeline (`source="tfds"`)'),
)


def ratios(results: dict) -> dict[str, dict[int, float]]:
    r = results
    return {
        "geo_vs_raw": {w: r[f"geotiff/{w}"] / r[f"raw/{w}"] for w in (0, 1, 2)},
        "ar_vs_geo": {w: r[f"arrayrecord/{w}"] / r[f"geotiff/{w}"] for w in (0, 1, 2)},
        "ar_vs_plain": {w: r[f"arrayrecord/{w}"] / r[f"plain/{w}"] for w in (0, 1, 2)},
    }


def section(run: dict, before: dict | None, command: str, n: int, args) -> str:
    """The "Data pipeline" section of BENCHMARKS.md: this run, beside a `--before` run when given."""
    after = run["results"]

    rows = route_rows(after, before["results"] if before else None, ".1f")
    cpu_rows = cpu_table(run, before)
    now = ratios(after)
    old = ratios(before["results"]) if before else None

    def pcts(name: str, fmt: str) -> str:
        values = " / ".join(format(now[name][w], fmt) for w in (0, 1, 2))
        return f"{' / '.join(format(old[name][w], fmt) for w in (0, 1, 2))} -> {values}" if old else values

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    goal_geo = min(now["geo_vs_raw"].values()) >= 0.8
    goal_ar = min(now["ar_vs_geo"].values()) >= 5 or min(now["ar_vs_plain"].values()) >= 0.8
    cmp = "" if not before else textwrap.fill(
        f"Before: the same script and data on commit {before['commit']} ({args.before_label}), "
        f"{before.get('runs', 1)} run(s), load average {before['load'][0]:.1f} to {before['load'][1]:.1f}; "
        f"after: commit {run['commit']}, {run.get('runs', 1)} run(s), load average {run['load'][0]:.1f} to "
        f"{run['load'][1]:.1f}. The plain-read row runs the same code both times: its spread is this shared "
        f"machine's noise (the raw-read row opens its files in `contract.GDAL_ENV`, the readers' settings).",
        width=110, initial_indent="\n")
    return f"""## Data pipeline

Command: `{command} --json after.json`, repeated (an existing --json file keeps the best of its runs), then
`... --json after.json --before before.json --report --write`
Machine: {report.cpu_model()}, {os.cpu_count()} CPU cores, no accelerator; Python {platform.python_version()}{cmp}
Date: {datetime.date.today().isoformat()}
{textwrap.fill(
    f"Data: {n} synthetic {args.size}x{args.size} training patches (13-band S2 clear + cloudy, 2-band S1, "
    f"cloud probability), warm page cache; batches of {args.batch}, shuffle, flips and rotations. Batches "
    f"leave the pipeline as {run['dtypes']}"
    + (f" (before: {before['dtypes']})" if before and before["dtypes"] != run["dtypes"] else "")
    + f"; `contract.normalize_batch` makes them float32 inside the jitted step: {run['normalize_ms']:.1f} ms "
    f"for a batch of {args.batch} on this CPU.", width=110)}

{handover_line(run, args.batch)}
{decode_line(run, before)}

{latent_line(run, before)}

Patches per second, best of {args.rounds * run.get("runs", 1)} rounds (0 = in the main process; loops: a pool of
that many processes; pipelines: grain worker processes){", before -> after" if before else ""}:

| route | 0 workers | 1 worker | 2 workers |
| --- | ---: | ---: | ---: |
{rows}
{cpu_rows}
Goals (0 / 1 / 2 workers{", before -> after" if before else ""}):
- GeoTIFF pipeline >= 80 % of the raw reads: {pcts("geo_vs_raw", ".0%")} ({met(goal_geo)}).
- ArrayRecord pipeline >= 5x the GeoTIFF pipeline: {pcts("ar_vs_geo", ".1f")}, or >= 80 % of a plain
  read of the same bytes: {pcts("ar_vs_plain", ".0%")} ({met(goal_ar)}).

{breakdown(after, "Where the time goes now")}
{breakdown(before["results"], f"Before ({args.before_label})") if before else ""}
{NOTES}"""


NOTES = "\n".join(textwrap.fill(text, width=110, initial_indent="- ", subsequent_indent="  ") for text in (
    "What changed in this round: how many threads read ahead in each reading process, when the config "
    "does not say (`pipeline.default_read_threads`). riegeli's reader lets go of the GIL while it reads and "
    "checks a record (two threads on one reader: 914-921 records/s, one: 466-471, this VM, 2026-12-03), "
    "and the in-place parse after it takes 0.04 ms, so the ArrayRecord source now reads with the cores each "
    "reading process has to itself (2 here without workers or with one, 1 with two; at most 4). GeoTIFFs "
    "keep one thread: a second thread there gave the same patches/s (233-240 against 233-237 in this "
    "process, 422-432 against 412-432 with two workers). rasterio holds the GIL through much of each open: "
    "`py-spy --gil` on two threads reading the GeoTIFF source put 35 % of the GIL's time in `rasterio.open`'s "
    "CRS build (`read_crs`, GDAL's `GetProjectionRef`), 21 % in the cloud map's open and read. "
    "And the flow stage's latent-cache iterator reads at most 4 batches ahead in one thread "
    "(`latent_cache.READ_AHEAD_BATCHES`): with grain's default read options it kept 500 batches in flight "
    "in 16 threads, 4 GB of host memory in each reading process at the flow stage's batch of 32 (the "
    "`latent_feed` line above), and the threads' contention made it slower too.",
    "The round before: the TFDS source reads each record's tf.Example in place "
    "(`crrf_jax.data.tf_example`): protobuf's parser copied the record's 4 MB into its message and "
    "`bytes_list.value[0]` copied them again into a Python bytes, 0.6-0.7 ms a record, against 0.04 ms for "
    "the walk over the wire format that hands out views of the record (the `decode_ms` line above). And "
    "every measurement now runs whole passes until `--min_seconds` (2 s) have gone by: one pass over 64 "
    "patches took a few tenths of a second, short enough for one slow moment of this VM to decide a "
    "figure.",
    "Earlier rounds: grain's `shuffle` computed every element's position with a keyed bijection whose cost "
    "grows as the dataset shrinks (0.4 ms an element at 64 elements); the training pipelines and the latent "
    "cache shuffle with `crrf_jax.data.epoch_shuffle`, one permutation drawn per epoch and looked up (about "
    "3 us an element). GeoTIFFs are read with one thread a process (`read_threads`, was 2): a second "
    "thread added CPU time without saving wall time. "
    "The reading processes keep their patch-sized buffers (`crrf_jax.data.host_memory`: "
    "glibc's malloc mapped, faulted in, zeroed and unmapped each of them at every read, which made the "
    "riegeli reader 5x slower in grain's workers); GeoTIFF opens take the CRS from the GeoKeys alone "
    "(`GTIFF_SRS_SOURCE=GEOKEYS`: GDAL built it twice per open); workers write each batch once into a "
    "shared-memory slot they reuse (`crrf_jax.data.shm_slots`; grain's fresh segment per array costs ten "
    "times the copy, the hand-over line above); the flips and rotations run in the jitted step "
    "(`contract.FLIP_ROTATE`), so the host batches crops as read instead of copying rotated views.",
    "What is left on the GeoTIFF route: the pipeline still costs 1-2 CPU ms a patch over the plain loop "
    "over its source (the batch copy, about 0.35 ms for 4 MB, grain's per-element machinery and the "
    "reading thread's hand-over). Opening the four files is about 40 % of a patch's read (about 0.6 ms of "
    "rasterio's set-up a file). This VM's speed drifts by 2x within minutes; with windows of one pass the "
    "same code's share of the raw reads moved by 20 points between two sets of runs. With 2 s windows four "
    "runs of the GeoTIFF route (two codes that do not differ on it) gave 96-105 % / 98-101 % / 90-93 %.",
    "The ArrayRecord route is bounded by the riegeli reader: about 1.2-3 ms for a 4 MB uncompressed record "
    "that one `pread` reads in 0.25-0.5 ms. Profiled (py-spy --native on a loop of reads): 29 % checking the "
    "chunk's HighwayHash, about half copying (the chunk out of the file, the record out of the chunk, into a "
    "Python bytes), 14 % the read itself. Neither of its goals can hold on this reader, and 80 % of a plain "
    "read cannot hold for any pipeline that copies each record once into a batch, which costs as much as the "
    "read. With the cores to spare, reading threads take the in-process pipeline past one reader's rate, "
    "not the CPU a patch costs. On an accelerator the normalisation and the transforms fuse into the step's first operations; on "
    "this CPU the 'device' is the same two cores.",
))


def route_rows(now: dict, old: dict | None, fmt: str) -> str:
    """The table rows of ROUTES at 0 / 1 / 2 workers: each figure of `now` (`old -> now` with `old`)."""
    def cell(key: str) -> str:
        return f"{old[key]:{fmt}} -> {now[key]:{fmt}}" if old else format(now[key], fmt)

    return "\n".join(f"| {label} | " + " | ".join(cell(f"{k}/{w}") for w in (0, 1, 2)) + " |"
                     for k, label in ROUTES)


def cpu_table(run: dict, before: dict | None) -> str:
    """The CPU time a patch costs on each route, all its processes together (`cpu_seconds`); "" for runs
    without it."""
    if "cpu_ms" not in run:
        return ""
    old = before.get("cpu_ms") if before else None
    rows = route_rows(run["cpu_ms"], old, ".2f")
    return f"""
CPU milliseconds a patch, all the route's processes together (the main one and its pool or workers; user +
system time from /proc, the least of the rounds){", before -> after" if old else ""}. CPU time leaves out the
time other guests of this VM held its cores, so it tells the work a patch costs apart from waiting; it still
moves with the VM's load (a vCPU whose physical core is shared runs slower and counts its time all the same):

| route | 0 workers | 1 worker | 2 workers |
| --- | ---: | ---: | ---: |
{rows}
"""


def handover_line(run: dict, batch: int) -> str:
    ms = run.get("handover_ms", {})
    if "fresh" not in ms:
        return ""
    slot = f", into a reused `shm_slots` slot {ms['slot']:.1f} ms" if "slot" in ms else ""
    return textwrap.fill(
        f"Handing a batch of {batch} from a worker to the main process, the worker's side (`handover_ms`, "
        f"best of 10): into grain's fresh shared-memory segments, one per array, {ms['fresh']:.1f} ms{slot}.",
        width=110)


def latent_line(run: dict, before: dict | None) -> str:
    now, old = run.get("latent_feed"), (before or {}).get("latent_feed")
    if not now:
        return ""

    def figures(f: dict) -> str:
        return (f"{f['ms']:.2f} ms a batch ({f['cpu_ms']:.2f} CPU ms), memory grown by {f['rss_mb']:.0f} MB after "
                f"{f['wait_s']:g} s")

    return textwrap.fill(
        f"The flow stage's latent-cache iterator (`latent_feed`: batches of {now['batch']} crops of "
        f"{now['size']} pixels, in its own process, the cache's {now['cache_mb']:.0f} MB of mapped pages "
        f"counted in its memory): {figures(now)}" + (f" (before: {figures(old)})." if old else "."), width=110)


def decode_line(run: dict, before: dict | None) -> str:
    ms = run.get("decode_ms")
    if not ms:
        return ""
    old = (before or {}).get("decode_ms")
    was = f" (before: {old['source']:.3f} ms)" if old else ""
    return "\n" + textwrap.fill(
        f"Turning a stored record's bytes into the TFDS source's arrays (`decode_ms`, best of 4 passes over 16 "
        f"records): the source's parse {ms['source']:.3f} ms a record{was}, protobuf's parser with "
        f"`bytes_list.value[0]` {ms['protobuf']:.3f} ms.", width=110)


def breakdown(results: dict, title: str) -> str:
    """Milliseconds a patch in this process (0 workers), stage by stage, from the loop and pipeline rates."""
    ms = {k.split("/")[0]: 1e3 / v for k, v in results.items() if k.endswith("/0")}
    return textwrap.fill(
        f"{title} (ms a patch, in-process): GeoTIFF route: raw reads {ms['raw']:.1f}, the source (checks, "
        f"the cloud map, channels last) "
        f"{ms['samples'] - ms['raw']:+.1f}, the pipeline (shuffle, augmentation, batching, threads) "
        f"{ms['geotiff'] - ms['samples']:+.1f} = {ms['geotiff']:.1f}. ArrayRecord route: a plain read "
        f"{ms['plain']:.1f}, the riegeli reader {ms['records']:.1f}, decoding the record "
        f"{ms['tfds_samples'] - ms['records']:+.1f}, the pipeline {ms['arrayrecord'] - ms['tfds_samples']:+.1f} "
        f"= {ms['arrayrecord']:.1f}.", width=110, initial_indent="- ", subsequent_indent="  ")


if __name__ == "__main__":
    main()
