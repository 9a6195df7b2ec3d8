"""Whole-scene prediction: seconds and peak memory of `python -m crrf_jax.predict` as the scene grows.

    python bench/predict_scene.py [--variants tiny,base] [--sizes 1024,2048,4096,4096x1024] [--steps 1]
                                  [--batch 8] [--model sampler,identity] [--uncertainty] [--in-flight N]
                                  [--device-rate R] [--s2-form stacked,safe]
                                  [--cloud-prob given|computed] [--cog] [--write] [--section NAME]

A size is N (N x N) or HxW (H rows, W columns).

For each size a synthetic scene (13-band uint16 S2, 2-band float32 S1 in dB at 20 m, so the resampling onto
the S2 grid runs too, and a uint8 cloud-probability file) is written window by window, and the predict
CLI runs on it in a fresh process with a random-weight bundle of the variant (speed and memory do not depend
on the weights). Reported: wall seconds of the child, tiles/s, megapixels/s, the child's peak resident
memory (ru_maxrss), its CPU seconds and its busiest Python thread's (THREADS_PATCH: the host's ceiling where
every thread has a core). The tiler holds a few rows of tiles, so the peak grows with the width and not
with the height (a tall HxW scene shows it); a 10980 x 10980
Sentinel-2 tile is extrapolated from the largest size at the measured pixel rate. --cloud-prob computed runs
s2cloudless on the scene too (CPU, inside the child). --model identity runs the same CLI with the sampler
replaced by an identity (IDENTITY_PATCH): the host pipeline's own tiles/s, what a device faster than the host
would be held to. --s2-form safe gives the CLI the same scene as an L1C SAFE product instead (write_safe:
MTD_MSIL1C.xml and a lossless JPEG 2000 file a band at its native resolution, as ESA ships them): the cost
of decoding JPEG 2000 and of resampling the 20 and 60 m bands. Runs unchanged on CPU and GPU.
`--write` puts the results into the "Scene prediction" section of BENCHMARKS.md (or --section's).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # noqa: E402 (bench/report.py, beside this script)
import sampling as sampling_bench  # noqa: E402 (bench/sampling.py: random-weight removers)

TILE_10980 = 10980 * 10980

# The child: the predict CLI, then on stdout's last line its peak memory, its CPU time and how that time fell
# on its threads (THREADS_PATCH).
CHILD = (
    "import json, resource, sys\n"
    "from crrf_jax import predict\n"
    "{threads}"
    "{patch}"
    "code = predict.main(sys.argv[1:])\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(json.dumps({'maxrss_mb': usage.ru_maxrss / 1024, 'cpu_s': usage.ru_utime + usage.ru_stime,\n"
    "                  'threads': _thread_cpu}))\n"
    "sys.exit(code)\n"
)

# Where the host's CPU time goes: each Python thread's own CPU seconds when it ends (by its name: read_rows_0,
# read_s2_files_3, ...; `pool_seconds` sums a pool's threads), and the caller's thread over
# `CloudRemover.process` ("caller"). Native threads (GDAL's compression and decoding, XLA's) are in the total
# and in no thread's figure. On a host with a core for each thread, the busiest thread bounds the pipeline:
# tiles / its seconds is the host's ceiling.
THREADS_PATCH = (
    "import collections, threading, time\n"
    "from crrf_jax.inference import CloudRemover\n"
    "_thread_cpu = collections.defaultdict(float)\n"
    "def _run(self, _inner=threading.Thread.run):\n"
    "    try:\n"
    "        _inner(self)\n"
    "    finally:\n"
    "        _thread_cpu[self.name] += time.thread_time()\n"
    "def _process(self, *a, _inner=CloudRemover.process, **k):\n"
    "    start = time.thread_time()\n"
    "    try:\n"
    "        return _inner(self, *a, **k)\n"
    "    finally:\n"
    "        _thread_cpu['caller'] += time.thread_time() - start\n"
    "threading.Thread.run, CloudRemover.process = _run, _process\n"
)

# --model identity: the sampler replaced by one that returns its cloudy input (std 0) as it lies on the
# device, so everything else runs as it does with a model (reading, normalising, batching, host<->device
# transfers, blending, DN conversion, compression, writing): the tiles/s of the host pipeline, the ceiling
# that a device faster than the host would see.
IDENTITY_PATCH = (
    "import jax.numpy as jnp\n"
    "from crrf_jax import sampling\n"
    "sampling.sample_patches_jit = lambda nets, cloudy, *a, **k: (cloudy, jnp.zeros_like(cloudy))\n"
)

# --device-rate R (with --model identity): the identity's results arrive as from a device sampling R
# tiles/s (bench/simulated_device.py): how far the host's own work hides behind the device's.
DEVICE_PATCH = (
    "sys.path.insert(0, 'bench')\n"
    "import simulated_device\n"
    "simulated_device.install({rate})\n"
)


def write_scene(directory: Path, height: int, width: int, seed: int = 0) -> dict[str, Path]:
    """A height x width synthetic scene written in row blocks (memory stays small whatever the size)."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    crs, transform = CRS.from_epsg(32631), from_origin(600_000.0, 5_300_000.0, 10.0, 10.0)
    paths = {"stacked": directory / "s2.tif", "s1": directory / "s1.tif",
             "cloud_prob": directory / "prob.tif"}
    common = dict(driver="GTiff", width=width, height=height, crs=crs, transform=transform, tiled=True,
                  blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
    s1_h, s1_w = height // 2, width // 2  # 20 m pixels over the same extent (warped onto the 10 m grid)
    s1_transform = from_origin(600_000.0, 5_300_000.0, 20.0, 20.0)
    with (rasterio.open(paths["stacked"], "w", count=13, dtype="uint16", **common) as s2,
          rasterio.open(paths["cloud_prob"], "w", count=1, dtype="uint8", **common) as prob,
          rasterio.open(paths["s1"], "w", **(common | dict(width=s1_w, height=s1_h, count=2,
                                                            dtype="float32", transform=s1_transform))) as s1):
        for y in range(0, height, 512):
            rows = min(512, height - y)
            base = rng.uniform(500, 4000, (13, 1, width)).astype(np.float32)
            s2.write((base + rng.normal(0, 200, (13, rows, width))).clip(1, 10000).astype(np.uint16),
                     window=((y, y + rows), (0, width)))
            window = ((y, y + rows), (0, width))
            prob.write(rng.integers(0, 256, (1, rows, width), dtype=np.uint8), window=window)
        for y in range(0, s1_h, 512):
            rows = min(512, s1_h - y)
            s1.write(rng.uniform(-25, 0, (2, rows, s1_w)).astype(np.float32),
                     window=((y, y + rows), (0, s1_w)))
    return paths


# --s2-form: how the scene's S2 reaches the CLI.
FORMS = {"stacked": "stacked GeoTIFF", "safe": "L1C SAFE (JP2)"}
SAFE_NAME = "S2B_MSIL1C_20230601T103631_N0509_R008_T31UFQ_20230601T140000.SAFE"
SAFE_TILE = "T31UFQ_20230601T103631"
SAFE_OFFSET = 1000  # DN: baseline 05.09 adds 1000 (RADIO_ADD_OFFSET -1000)
SAFE_BLOCK = 1024  # the JP2 codestream tiles' side


def write_safe(directory: Path, stacked: Path) -> Path:
    """The stacked S2 file's scene as an L1C SAFE product: the MTD_MSIL1C.xml the reader takes the offsets
    from, and one lossless JPEG 2000 file a band at the band's native resolution (20 and 60 m bands the mean
    of 2 x 2 or 6 x 6 pixels, the edge repeated to a whole coarse pixel), holding DN + SAFE_OFFSET."""
    import xml.etree.ElementTree as ET

    import rasterio
    from rasterio.transform import Affine

    from crrf_jax.data import contract
    from crrf_jax.scene import s2 as scene_s2

    safe = directory / SAFE_NAME
    img = safe / "GRANULE" / "L1C_T31UFQ_A032000_20230601T104000" / "IMG_DATA"
    img.mkdir(parents=True)
    root = ET.Element("n1:Level-1C_User_Product", {"xmlns:n1": "https://psd-14.sentinel2.eo.esa.int/PSD/"
                                                                "User_Product_Level-1C.xsd"})
    info = ET.SubElement(ET.SubElement(root, "n1:General_Info"), "Product_Info")
    ET.SubElement(info, "PROCESSING_LEVEL").text = "Level-1C"
    ET.SubElement(info, "PROCESSING_BASELINE").text = "05.09"
    image = ET.SubElement(root.find("n1:General_Info"), "Product_Image_Characteristics")
    ET.SubElement(image, "QUANTIFICATION_VALUE", unit="none").text = "10000"
    offsets = ET.SubElement(image, "Radiometric_Offset_List")
    spectral = ET.SubElement(image, "Spectral_Information_List")
    for i, band in enumerate(contract.S2_BANDS):
        ET.SubElement(offsets, "RADIO_ADD_OFFSET", band_id=str(i)).text = str(-SAFE_OFFSET)
        physical = "B" + band[1:].lstrip("0")
        ET.SubElement(spectral, "Spectral_Information", bandId=str(i), physicalBand=physical)
    ET.ElementTree(root).write(safe / "MTD_MSIL1C.xml", encoding="UTF-8", xml_declaration=True)
    with rasterio.open(stacked) as src:
        for k, band in enumerate(contract.S2_BANDS):
            step = scene_s2.NATIVE_RESOLUTION[band] // 10
            dn = src.read(k + 1).astype(np.float32)
            h, w = -(-dn.shape[0] // step), -(-dn.shape[1] // step)
            dn = np.pad(dn, ((0, h * step - dn.shape[0]), (0, w * step - dn.shape[1])), mode="edge")
            coarse = dn.reshape(h, step, w, step).mean(axis=(1, 3))
            profile = dict(driver="JP2OpenJPEG", width=w, height=h, count=1, dtype="uint16", crs=src.crs,
                           transform=src.transform * Affine.scale(step), QUALITY=100, REVERSIBLE="YES",
                           BLOCKXSIZE=min(SAFE_BLOCK, w), BLOCKYSIZE=min(SAFE_BLOCK, h))
            with rasterio.open(img / f"{SAFE_TILE}_{band}.jp2", "w", **profile) as dst:
                dst.write(np.rint(coarse + SAFE_OFFSET).astype(np.uint16), 1)
    return safe


def run_one(bundle_dir: Path, scene: dict[str, Path], form: str, out: Path, model: str,
            args) -> dict[str, float]:
    patch = IDENTITY_PATCH if model == "identity" else ""
    if model == "identity" and args.device_rate:
        patch += DEVICE_PATCH.replace("{rate}", repr(float(args.device_rate)))
    if args.in_flight is not None:  # an ablation of the tiler's default, which the CLI does not expose
        patch += ("from crrf_jax import tiling\n"
                  f"tiling.blend_tiles.__kwdefaults__['in_flight'] = {int(args.in_flight)}\n")
    child = CHILD.replace("{threads}", THREADS_PATCH).replace("{patch}", patch)
    cmd = [sys.executable, "-c", child, f"--bundle={bundle_dir}", f"--s2={scene[form]}",
           f"--s1={scene['s1']}",
           f"--out={out}", f"--steps={args.steps}", f"--batch-size={args.batch}", "--quiet"]
    if args.uncertainty:
        cmd.append(f"--uncertainty={out.with_name('std.tif')}")
    if args.cloud_prob == "given":
        cmd.append(f"--cloud-prob={scene['cloud_prob']}")
    if not args.cog:
        cmd.append("--no-cog")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"predict failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    fields = lines[-2].rsplit("(", 1)[1].split(", ")  # "wrote ... (HxW, N tiles, S s)"
    tiles, seconds = int(fields[1].split()[0]), float(fields[2].split()[0])
    return {"wall_s": wall, "predict_s": seconds, "tiles": tiles, **json.loads(lines[-1])}


def pool_seconds(threads: dict[str, float]) -> dict[str, tuple[float, int]]:
    """Pool name (a thread's name without its index: read_s2_files_3 -> read_s2_files) -> (its threads' CPU
    seconds together, how many threads)."""
    pools: dict[str, tuple[float, int]] = {}
    for name, seconds in threads.items():
        head, _, index = name.rpartition("_")
        pool = head if index.isdigit() else name
        total, count = pools.get(pool, (0.0, 0))
        pools[pool] = (total + seconds, count + 1)
    return pools


def result_row(variant: str, sampler: str, form: str, h: int, w: int, r: dict) -> tuple:
    """One table row from a child's results, printed as it comes."""
    mpx, threads = h * w / 1e6, r["threads"]
    busiest = max(threads, key=threads.get)
    pools = ", ".join(f"{k} {v:.1f} s" + (f" ({n} threads)" if n > 1 else "")
                      for k, (v, n) in pool_seconds(threads).items())
    print(f"{variant} {sampler} {form} {h}x{w}: {r['tiles']} tiles in {r['wall_s']:.1f} s "
          f"({r['predict_s']:.1f} s in predict), peak {r['maxrss_mb']:.0f} MB, CPU {r['cpu_s']:.1f} s, "
          f"threads {pools}", flush=True)
    mps = mpx / r["wall_s"]
    return (variant, sampler, form, f"{h}x{w}", r["tiles"], r["wall_s"], r["predict_s"],
            r["tiles"] / r["wall_s"], mps, r["maxrss_mb"], TILE_10980 / 1e6 / mps / 60, r["cpu_s"],
            f"{busiest} {threads[busiest]:.1f}", r["tiles"] / threads[busiest])


def format_table(rows: list[tuple]) -> str:
    header = ("| variant | sampler | S2 input | scene (HxW) | tiles | seconds | in predict (s) | tiles/s "
              "| Mpx/s | peak RSS (MB) | 10980² estimate (min) | CPU (s) | busiest thread (CPU s) "
              "| its ceiling (tiles/s) |\n"
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: |\n")
    return header + "".join(
        f"| {v} | {m} | {FORMS[f]} | {s} | {t} | {w:.1f} | {p:.1f} | {tps:.2f} | {mps:.3f} | {rss:.0f} "
        f"| {est:.0f} | {cpu:.1f} | {busy} | {ceiling:.0f} |\n"
        for v, m, f, s, t, w, p, tps, mps, rss, est, cpu, busy, ceiling in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="tiny")
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cloud-prob", choices=("given", "computed"), default="given")
    parser.add_argument("--cog", action="store_true", help="Cloud-Optimized outputs (default: plain tiled)")
    parser.add_argument("--uncertainty", action="store_true", help="also write the float32 std GeoTIFF")
    parser.add_argument("--model", default="sampler",
                        help="sampler and/or identity, comma-separated (identity: the host pipeline alone, "
                             "see IDENTITY_PATCH)")
    parser.add_argument("--dtype", default="auto", help="the bundle's compute dtype: auto (float32 on CPU, "
                                                         "bfloat16 on GPU/TPU) | float32 | bfloat16")
    parser.add_argument("--device-rate", type=float, default=None,
                        help="with --model identity: results as from a device of this many tiles/s "
                             "(DEVICE_PATCH)")
    parser.add_argument("--in-flight", type=int, default=None,
                        help="batches the tiler submits ahead (default: tiling.IN_FLIGHT_BATCHES)")
    parser.add_argument("--s2-form", default="stacked",
                        help="how the S2 reaches the CLI, comma-separated: " + ", ".join(
                            f"{k} ({v})" for k, v in FORMS.items()))
    parser.add_argument("--section", default="Scene prediction")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import jax

    from crrf_jax import bundle

    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")

    models = args.model.split(",")
    if not set(models) <= {"sampler", "identity"}:
        raise SystemExit(f"--model: sampler and/or identity, got {args.model!r}")
    forms = args.s2_form.split(",")
    if not set(forms) <= set(FORMS):
        raise SystemExit(f"--s2-form: {' and/or '.join(FORMS)}, got {args.s2_form!r}")
    rows, scenes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for variant in args.variants.split(","):
            bundle_dir = tmp / f"bundle_{variant}"
            bundle.write_bundle(sampling_bench.random_parts(variant, dtype), bundle_dir)
            for size, model, form in itertools.product(args.sizes.split(","), models, forms):
                h, w = (int(v) for v in (size.split("x") if "x" in size else (size, size)))
                scene_dir = tmp / f"scene_{h}x{w}"
                if (h, w) not in scenes:
                    scene_dir.mkdir()
                    scenes[h, w] = write_scene(scene_dir, h, w)
                if form not in scenes[h, w]:  # the SAFE product, made from the stacked file when first asked
                    scenes[h, w][form] = write_safe(scene_dir, scenes[h, w]["stacked"])
                r = run_one(bundle_dir, scenes[h, w], form, tmp / "out.tif", model, args)
                sampler = "identity" if model == "identity" else f"{args.steps} step(s)"
                rows.append(result_row(variant, sampler, form, h, w, r))
    table = format_table(rows)
    text = (f"## {args.section}\n\n`python bench/predict_scene.py {' '.join(sys.argv[1:])}` on "
            f"{report.machine()}, {datetime.date.today()}; compute dtype {dtype}, {args.steps} Euler step(s) "
            "(identity: the sampler "
            f"replaced by one returning its input, the host pipeline alone), batch {args.batch}"
            f"{'' if args.in_flight is None else f' with {args.in_flight} in flight'}"
            f"{'' if not args.device_rate else f', identity as a device of {args.device_rate:g} tiles/s'}"
            ", cloud "
            f"probability {args.cloud_prob}, {'COG' if args.cog else 'plain tiled'} output"
            f"{' and float32 uncertainty' if args.uncertainty else ''}, S1 resampled from 20 m; S2 input as "
            "the 'S2 input' column says (L1C SAFE: lossless JPEG 2000 band files at native resolution, "
            f"{SAFE_BLOCK}² codestream tiles, the 20 and 60 m bands resampled onto the 10 m grid). "
            "Each run is a fresh process; seconds and tiles/s are the child's wall time (compiling "
            "included), 'in predict' the CLI's own count from opening the inputs to the published outputs. "
            "CPU: the child's user + system seconds; the busiest thread's own CPU seconds (THREADS_PATCH: "
            "read_rows, write_rows, the caller's over the tile loop, ...) bound the host on a machine with a "
            "core for each thread, at tiles / those seconds.\n\n"
            f"{table}")
    print(text)
    if args.write:
        report.write_section(args.section, text)


if __name__ == "__main__":
    main()
