"""Sampling throughput: tiles per second through CloudRemover, and where the time goes (encode, steps, decode).

    python bench/sampling.py [--variant base] [--size 256] [--steps 1,2,4,8] [--batch 0] [--repeats 3]
                             [--dtype auto] [--samples 1] [--samples-per-pass 1] [--guidance 1.0]
                             [--sweep-steps ""] [--no-split] [--budget-s 0] [--section Sampling] [--write]
                             [--json FILE]

Random weights of the chosen variant (the speed does not depend on them), the whole inference path of one tile
batch: both VAE encoders, `steps` transformer evaluations (two per step with --guidance != 1, as one call of
twice the rows), the S2 decoder and the refiner, sharded over every device of the ('data',) mesh. Each setting
is compiled and run once (the compile time is reported), then `repeats` batches are timed one by one; the
best and the median are reported (the best is the figure least disturbed by other work on a shared machine).
--batch lists batch sizes (0 picks one tile per device on CPU and 8 per device on an accelerator), e.g.
`--batch 8,32,128` on a GPU to find the size that fills it; the first batch runs every step count, the others
those of --sweep-steps (default: every one). A setting that fails (out of memory, say) is listed, not fatal.
--samples-per-pass lists how many of the K samples run at once as extra batch rows
(`CloudRemover.predict_tiles(samples_per_pass=...)`), each value a setting of its own.

The split (on unless --no-split): the same pieces `sampling.sample_patches` is made of, jitted one by one and
run on the same device-resident tiles of each batch size: both encoders (`sampling.encode`, with the input
normalisation), one evaluation of the flow model's velocity (`sampling._velocity_fn`, cloud CNN and token
assembly included) at the sampler's rows, and the decoder with the refiner. Each is timed (best of `repeats`,
run to completion) after its compile run; transformer time = evaluations x one evaluation (an Euler step adds
only an axpy). "other" = the end-to-end batch minus the pieces: host <-> device transfers, noise, Euler
arithmetic, the ensemble statistics, and the dispatch of one program instead of several (it can be negative
when one fused program beats its parts).
--budget-s stops starting new settings once that many seconds have passed (0: no limit); settings left out are
listed. --dtype auto is float32 on CPU and bfloat16 on GPU/TPU. Runs unchanged on CPU, GPU and TPU.
`--write` puts the results into the --section section of BENCHMARKS.md (or of $CRRF_BENCHMARKS).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import jax
import jax.numpy as jnp
import report  # bench/report.py, beside this script
from flax import nnx

from configs import common
from crrf_jax import bundle, parallel, sampling, temporal
from crrf_jax.data import contract
from crrf_jax.inference import CloudRemover


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
    tiles = random_tiles(remover, size, batch)
    ids = np.arange(batch)
    kw = {"steps": steps, "num_samples": samples, "guidance_scale": guidance, "samples_per_pass": samples_per_pass}
    t0 = time.perf_counter()
    remover.predict_tiles(tiles, ids, **kw)  # compile + first run (results come back to the host)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        remover.predict_tiles(tiles, ids + (i + 1) * batch, **kw)
        times.append(time.perf_counter() - t0)
    best, median = min(times), float(np.median(times))
    return {"batch": batch, "steps": steps, "samples_per_pass": samples_per_pass, "compile_s": compile_s,
            "best_s": best, "tiles_per_s": batch / best, "s_per_tile": best / batch,
            "median_tiles_per_s": batch / median}


def random_tiles(remover: CloudRemover, size: int, batch: int) -> dict[str, np.ndarray]:
    """A batch of random tiles in [0, 1], as `CloudRemover.predict_tiles` takes them."""
    rng = np.random.default_rng(0)
    return {
        "s2_cloudy": rng.uniform(0, 0.5, (batch, size, size, remover.num_bands)).astype(np.float32),
        "s1": rng.uniform(0, 1, (batch, size, size, 2)).astype(np.float32),
        "cloud_prob": rng.uniform(0, 1, (batch, size, size, 1)).astype(np.float32),
    }


def _timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile + first run seconds, best of `repeats` runs) of fn(*args), each run to completion."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, min(times)


def measure_split(remover: CloudRemover, size: int, batch: int, samples_per_pass: int, guidance: float,
                  repeats: int) -> dict[str, float]:
    """Seconds of the sampler's pieces on one batch: encoders, one velocity evaluation, decoder + refiner.

    The pieces are those `sampling.sample_patches` composes, jitted separately over the same device-resident
    tiles (batch-sharded like `predict_tiles`'s). The velocity and the decoder see `samples_per_pass` rows per
    tile, as in a pass of the sampler.
    """
    mesh, nets = remover.mesh, remover.nets
    host = random_tiles(remover, size, batch)
    put = lambda a: parallel.put_global(a, parallel.batch_sharding(mesh, a.ndim))
    s2c, s1, prob = put(host["s2_cloudy"]), put(host["s1"]), put(host["cloud_prob"])

    @jax.jit
    def encode(nets, s2c, s1):
        s2c = contract.normalize_array("s2_cloudy", s2c)
        return sampling.encode(nets.vae_s2(), s2c), sampling.encode(nets.vae_s1(), s1)

    @jax.jit
    def velocity(nets, x, t, cloudy, sar, prob):
        return sampling._velocity_fn(nets.flow(), cloudy, sar, prob, guidance, False, None)(x, t)

    @jax.jit
    def decode(nets, x0, s2c, prob, s1):
        vae_s2, refiner = nets.vae_s2(), nets.refiner()
        pixels = contract.from_model(vae_s2.decode(x0).astype(jnp.float32))
        if refiner is None:
            return pixels
        view = temporal.single_view(s2c, prob, s1)
        return refiner(pixels, *sampling._repeat_rows(x0.shape[0] // s2c.shape[0], *view, None))[0]

    enc_compile, enc_s = _timed(encode, nets, s2c, s1, repeats=repeats)
    cloudy, sar = encode(nets, s2c, s1)
    rows = batch * samples_per_pass
    x = put(np.random.default_rng(1).standard_normal((rows, *cloudy.shape[1:]), np.float32))
    t = put(np.full((rows,), 0.5, np.float32))
    vel_compile, vel_s = _timed(velocity, nets, x, t, cloudy, sar, prob, repeats=repeats)
    dec_compile, dec_s = _timed(decode, nets, x, s2c, prob, s1, repeats=repeats)
    return {"encode_s": enc_s, "velocity_s": vel_s, "decode_s": dec_s,
            "compile_s": enc_compile + vel_compile + dec_compile}


def split_columns(r: dict, split: dict, samples: int, samples_per_pass: int) -> dict[str, float]:
    """Seconds of one end-to-end batch `r` attributed to encode, transformer, decode and the rest."""
    passes = -(-samples // samples_per_pass)
    encode, steps = split["encode_s"], r["steps"] * passes * split["velocity_s"]
    decode = passes * split["decode_s"]
    return {"encode": encode, "transformer": steps, "decode": decode,
            "other": r["best_s"] - encode - steps - decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="base", choices=common.VARIANTS)
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels")
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated Euler step counts")
    parser.add_argument("--batch", default="0", help="comma-separated tiles per batch (0: by device kind)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per setting")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | bfloat16")
    parser.add_argument("--samples", type=int, default=1, help="samples per tile (K)")
    parser.add_argument("--samples-per-pass", default="1",
                        help="comma-separated pass sizes: K samples run this many at once as batch rows")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (!= 1 doubles the work)")
    parser.add_argument("--sweep-steps", default="",
                        help="step counts run at the batch sizes after the first (default: all of --steps)")
    parser.add_argument("--no-split", action="store_true", help="skip the encode / steps / decode split")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no new setting after this many seconds (0: no limit)")
    parser.add_argument("--section", default="Sampling", help="BENCHMARKS.md section to write")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    start = time.perf_counter()
    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    batches = [int(b) or jax.device_count() * (1 if on_cpu else 8) for b in args.batch.split(",")]
    per_pass = [min(int(p), args.samples) for p in args.samples_per_pass.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    sweep_steps = [int(s) for s in args.sweep_steps.split(",")] if args.sweep_steps else steps_list
    t0 = time.perf_counter()
    remover = random_remover(args.variant, dtype)
    setup_s = time.perf_counter() - t0
    rows, skipped, failed = [], [], []
    for n, batch in enumerate(batches):
        for p in per_pass:
            split = None
            for steps in steps_list if n == 0 else sweep_steps:
                setting = f"batch {batch}, {p} per pass, {steps} steps"
                if args.budget_s and time.perf_counter() - start > args.budget_s:
                    skipped.append(setting)
                    continue
                try:  # one setting out of memory (a batch too large for the device) does not end the sweep
                    r = measure(remover, args.size, batch, steps, args.samples, args.guidance, args.repeats, p)
                    if not args.no_split and split is None:
                        split = measure_split(remover, args.size, batch, p, args.guidance, args.repeats)
                except Exception as e:  # noqa: BLE001 - reported in the table's notes
                    failed.append(f"{setting}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    print(f"{setting} failed: {failed[-1]}", flush=True)
                    continue
                r["split"] = split_columns(r, split, args.samples, p) if split else None
                r["split_compile_s"] = split["compile_s"] if split else None
                rows.append(r)
                parts = ""
                if r["split"]:
                    parts = ", split (ms/tile) " + ", ".join(
                        f"{k} {v / batch * 1e3:.1f}" for k, v in r["split"].items())
                print(f"batch {batch}, steps {steps}, {p} sample(s) per pass: {r['tiles_per_s']:.3f} tiles/s "
                      f"best ({r['s_per_tile']:.3f} s/tile), {r['median_tiles_per_s']:.3f} median, compile + "
                      f"first batch {r['compile_s']:.1f} s{parts}", flush=True)

    if args.json:
        report.write_json(args.json, {"rows": rows, "failed": failed, "skipped": skipped, "dtype": dtype,
                                      "setup_s": setup_s})
    command = shlex.join(["python", "bench/sampling.py", *sys.argv[1:]])
    lines = [
        f"## {args.section}",
        "",
        f"`{command.strip()}` ({datetime.date.today().isoformat()}; {time.perf_counter() - start:.0f} s)",
        "",
        f"Machine: {report.machine()}.",
        (f"Model: `{args.variant}` variant, random weights, compute dtype {dtype}; "
        f"{args.size}x{args.size} tiles, {args.samples} sample(s) per tile, guidance {args.guidance:g}; each "
        f"batch timed on its own, {args.repeats} batches after a compile run (weights set up in "
        f"{setup_s:.1f} s); best and median batch reported."),
        ("One tile = both VAE encoders, `steps` transformer evaluations, the S2 decoder and the refiner; host "
        "transfers included. Split (ms per tile, from the best batch): the sampler's pieces jitted one by one "
        "on the same device-resident tiles (`bench/sampling.py` docstring): encode = both encoders, "
        "transformer = evaluations x one velocity evaluation, decode = S2 decoder + refiner, other = the "
        "end-to-end batch minus those (transfers, noise, Euler arithmetic, statistics)."),
        "",
        ("| batch | Euler steps | samples per pass | tiles/s (best) | tiles/s (median) | encode | transformer "
         "| decode | other | compile + first batch (s) | split compile (s) |"),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        sp = r["split"]
        cells = ([f"{sp[k] / r['batch'] * 1e3:.1f}" for k in ("encode", "transformer", "decode", "other")]
                 if sp else ["-"] * 4)
        split_compile = f"{r['split_compile_s']:.1f}" if r["split_compile_s"] is not None else "-"
        lines.append(f"| {r['batch']} | {r['steps']} | {r['samples_per_pass']} | {r['tiles_per_s']:.3f} | "
                     f"{r['median_tiles_per_s']:.3f} | " + " | ".join(cells)
                     + f" | {r['compile_s']:.1f} | {split_compile} |")
    if failed:
        lines += ["", "Failed: " + "; ".join(failed) + "."]
    if skipped:
        lines += ["", f"Not run (--budget-s {args.budget_s:g} reached): " + "; ".join(skipped) + "."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        report.write_section(args.section, text)


if __name__ == "__main__":
    main()
