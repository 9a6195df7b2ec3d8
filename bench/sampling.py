"""Sampling throughput: 256x256 tiles per second through CloudRemover for 1, 4 and 8 Euler steps.

    python bench/sampling.py [--variant base] [--size 256] [--steps 1,4,8] [--batch 0] [--repeats 3]
                             [--dtype auto] [--samples 1] [--samples-per-pass 1] [--guidance 1.0] [--write]

Random weights of the chosen variant (the speed does not depend on them), the whole inference path of one tile
batch: both VAE encoders, `steps` transformer evaluations (two per step with --guidance != 1), the S2 decoder,
sharded over every device of the ('data',) mesh. Each setting is compiled and run once (the compile time is
reported), then `repeats` batches are timed one by one; the best and the median are reported (the best is the
figure least disturbed by other work on a shared machine). --samples-per-pass lists how many of the K samples
run at once as extra batch rows (`CloudRemover.predict_tiles(samples_per_pass=...)`), each value a setting of
its own, so a large device can be checked for the pass size that fills it best. --batch 0 picks one tile per
device on CPU and 8 per device on an accelerator; --dtype auto is float32 on CPU and bfloat16 on GPU/TPU.
Runs unchanged on CPU, GPU and TPU.
`--write` puts the results into the "Sampling" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # noqa: E402 (bench/report.py, beside this script)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import common  # noqa: E402
from crrf_jax import bundle  # noqa: E402
from crrf_jax.inference import CloudRemover  # noqa: E402


def random_remover(variant: str, dtype: str, seed: int = 0) -> CloudRemover:
    """A CloudRemover of `variant` with random weights drawn on the host (no slow eager initialisation)."""
    return CloudRemover.from_parts(random_parts(variant, dtype, seed))


def random_parts(variant: str, dtype: str, seed: int = 0) -> bundle.ModelParts:
    """The bundle parts of `variant` with random weights of sensible scale (fan-in scaled kernels)."""
    config = common.base_config(variant)
    config.dtype = dtype
    cfg = bundle.bundle_config(config)
    rng = np.random.default_rng(seed)
    states = {}
    for name in bundle.NETWORKS:
        _, state = nnx.split(bundle.abstract_network(cfg, name))
        flat = {}
        for path, leaf in bundle._walk(nnx.to_pure_dict(state)):
            shape, last = tuple(leaf.shape), str(path[-1])
            if last in ("scale_factor", "scale"):
                value = np.ones(shape, np.float32)
            elif last == "kernel":
                fan_in = shape[-2] if len(shape) == 3 else int(np.prod(shape[:-1]))
                value = rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)
            else:
                value = 0.02 * rng.standard_normal(shape, np.float32)
            flat["/".join(map(str, path))] = value.astype(leaf.dtype)
        states[name] = flat
    stats = {name: {"scale_factor": 1.0, "shift_factor": 0.0} for name in ("vae_s2", "vae_s1")}
    return bundle.ModelParts(cfg, states, stats, f"random {variant}")


def measure(remover: CloudRemover, size: int, batch: int, steps: int, samples: int, guidance: float,
            repeats: int, samples_per_pass: int = 1) -> dict[str, float]:
    """Compile seconds, and tiles/s of the fastest and the median of `repeats` batches of `batch` tiles.

    The fastest batch is the figure least disturbed by other work on a shared machine.
    """
    rng = np.random.default_rng(0)
    tiles = {
        "s2_cloudy": rng.uniform(0, 0.5, (batch, size, size, remover.num_bands)).astype(np.float32),
        "s1": rng.uniform(0, 1, (batch, size, size, 2)).astype(np.float32),
        "cloud_prob": rng.uniform(0, 1, (batch, size, size, 1)).astype(np.float32),
    }
    ids = np.arange(batch)
    kw = dict(steps=steps, num_samples=samples, guidance_scale=guidance, samples_per_pass=samples_per_pass)
    t0 = time.perf_counter()
    remover.predict_tiles(tiles, ids, **kw)  # compile + first run (results come back to the host)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        remover.predict_tiles(tiles, ids + (i + 1) * batch, **kw)
        times.append(time.perf_counter() - t0)
    best, median = min(times), float(np.median(times))
    return {"steps": steps, "samples_per_pass": samples_per_pass, "compile_s": compile_s,
            "tiles_per_s": batch / best, "s_per_tile": best / batch, "median_tiles_per_s": batch / median}





def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="base", choices=common.VARIANTS)
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels")
    parser.add_argument("--steps", default="1,4,8", help="comma-separated Euler step counts")
    parser.add_argument("--batch", type=int, default=0, help="tiles per batch (0: by device kind)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per setting")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | bfloat16")
    parser.add_argument("--samples", type=int, default=1, help="samples per tile (K)")
    parser.add_argument("--samples-per-pass", default="1",
                        help="comma-separated pass sizes: K samples run this many at once as batch rows")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (!= 1 doubles the work)")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = parser.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    batch = args.batch or jax.device_count() * (1 if on_cpu else 8)
    t0 = time.perf_counter()
    remover = random_remover(args.variant, dtype)
    setup_s = time.perf_counter() - t0
    rows = []
    per_pass = [int(p) for p in args.samples_per_pass.split(",")]
    for steps in (int(s) for s in args.steps.split(",")):
        for p in per_pass:
            r = measure(remover, args.size, batch, steps, args.samples, args.guidance, args.repeats, p)
            rows.append(r)
            print(f"steps {steps}, {p} sample(s) per pass: {r['tiles_per_s']:.3f} tiles/s best "
                  f"({r['s_per_tile']:.2f} s/tile), {r['median_tiles_per_s']:.3f} median, "
                  f"compile + first batch {r['compile_s']:.1f} s", flush=True)

    command = "python bench/sampling.py " + " ".join(sys.argv[1:])
    lines = [
        "## Sampling",
        "",
        f"`{command.strip()}` ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {report.machine()}.",
        f"Model: `{args.variant}` variant, random weights, compute dtype {dtype}; "
        f"{args.size}x{args.size} tiles, batch {batch}, {args.samples} sample(s) per tile, "
        f"guidance {args.guidance:g}; each batch timed on its own, {args.repeats} batches after a compile "
        f"run (weights set up in {setup_s:.1f} s); best and median batch reported.",
        "One tile = both VAE encoders, `steps` transformer evaluations, the S2 decoder; host transfers "
        "included.",
        "",
        ("| Euler steps | samples per pass | tiles/s (best) | s/tile (best) | tiles/s (median) "
         "| compile + first batch (s) |"),
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['steps']} | {r['samples_per_pass']} | {r['tiles_per_s']:.3f} | {r['s_per_tile']:.2f} | "
              f"{r['median_tiles_per_s']:.3f} | {r['compile_s']:.1f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.write:
        report.write_section("Sampling", text)


if __name__ == "__main__":
    main()
