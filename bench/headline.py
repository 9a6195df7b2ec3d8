"""Issue 13's headline figures, re-measured side by side in one run, beside the figures it was filed with.

    python bench/headline.py [--write] [--keep DIR]
    python bench/headline.py --report DIR,DIR,... [--write]

Runs, one after another, each in its own process (so one cannot warm or starve the next):
- `bench/data_pipeline.py --n 64 --size 256 --batch 8 --passes 2 --rounds 3 --min_seconds 2`: the GeoTIFF and
  ArrayRecord pipelines against the raw rasterio reads and a plain read of the ArrayRecord bytes;
- `bench/train_step.py --variants base --steps 3`: the base flow train step, JAX against diffusers'
  FluxTransformer2DModel, and its MFU against the machine's peak (on CPU: from the processor's vector width);
- `bench/sampling.py --variant base --size 256 --steps 4 --batch 1 --repeats 2 --no-split`: base sampling at 4
  Euler steps, tiles/s;
each writing its figures with --json (10-13 minutes in all on 2 cores), with a probe of the machine's
speed (a matmul, a memory copy) before and after, and composes one table: figure, as filed (2026-12-01, the
issue's own table), this run, the goal, and whether it holds. A run kept with --keep DIR leaves its whole
record in DIR/headline.json; --report measures nothing and puts kept runs side by side, a column each.
The GPU goals (the train step against diffusers in bf16 on one H100/H200, sampling tiles/s there) cannot be
judged on a CPU: their rows say what the CPU measured and that `bench/gpu.sh` is where they are decided.
`--write` puts the table into the "Headline figures (issue 13)" section of BENCHMARKS.md (or of
$CRRF_BENCHMARKS).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import report  # noqa: E402 (bench/report.py, beside this script)

SECTION = "Headline figures (issue 13)"
WORKERS = (0, 1, 2)
# The table as filed (2026-12-01, the Xeon VM of that day; its sampling figure is from the Sampling
# table of 2026-11-21).
FILED = {
    "geotiff_share": (0.68, 0.47, 0.33),
    "arrayrecord_ratio": (3.3, 2.3, 2.2),
    "step_s": (2.54, 2.65),  # JAX, diffusers
    "mfu": 1.08,
    "tiles_per_s": 0.041,
}
BENCHES = {
    "data_pipeline": ["bench/data_pipeline.py", "--n", "64", "--size", "256", "--batch", "8", "--passes", "2",
                      "--rounds", "3", "--min_seconds", "2"],
    "train_step": ["bench/train_step.py", "--variants", "base", "--steps", "3"],
    "sampling": ["bench/sampling.py", "--variant", "base", "--size", "256", "--steps", "4", "--batch", "1",
                 "--repeats", "2", "--no-split"],
}


# How fast this machine is at the moment, before and after the benches: a VM's speed moves from one VM to the
# next (vector width, memory bandwidth) and from day to day (its cores' share), and the figures move with it.
PROBE = """
import json, time
import jax, jax.numpy as jnp, numpy as np
a, b = jnp.ones((768, 3072), jnp.float32), jnp.ones((3072, 768), jnp.float32)
mm = jax.jit(lambda a, b: a @ b)
mm(a, b).block_until_ready()
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    for _ in range(10):
        mm(a, b).block_until_ready()
    best = min(best, (time.perf_counter() - t) / 10)
src, dst = np.ones(32 << 20, np.float64), np.empty(32 << 20, np.float64)
copy = float("inf")
for _ in range(5):
    t = time.perf_counter()
    np.copyto(dst, src)
    copy = min(copy, time.perf_counter() - t)
gflops = 2 * 768 * 3072 * 768 / best / 1e9
print(json.dumps({"matmul_gflops": gflops, "copy_gbs": 2 * src.nbytes / copy / 1e9}))
"""


def probe() -> dict[str, float]:
    """The machine's speed now: a float32 matmul of the base model's shape in JAX (GFLOP/s, best of 5) and a
    256 MB memory copy (GB/s read + written, best of 5), in a process of its own."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benches(work: Path) -> tuple[dict[str, dict], dict[str, float]]:
    """({bench: its --json figures}, {bench: wall seconds}); a bench that fails raises with the tail of its
    output."""
    figures, seconds = {}, {}
    for name, argv in BENCHES.items():
        out = work / f"{name}.json"
        out.unlink(missing_ok=True)  # data_pipeline.py merges into an existing file: this run only
        extra = ["--work", str(work / "data")] if name == "data_pipeline" else []
        cmd = [sys.executable, *argv, *extra, "--json", str(out)]
        t0 = time.perf_counter()
        print(f"running {shlex.join(argv)}", flush=True)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        seconds[name] = time.perf_counter() - t0
        (work / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-3000:]
            raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}):\n{tail}")
        figures[name] = json.loads(out.read_text())
    return figures, seconds


def _triple(values, fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


def figures_of(run: dict) -> dict[str, object]:
    """One run's headline figures from its benches' JSON."""
    pipe = run["figures"]["data_pipeline"]["results"]
    steps = run["figures"]["train_step"]
    by_side = {r["side"]: r for r in steps["rows"] if r["variant"] == "base"}
    return {
        "share": [pipe[f"geotiff/{w}"] / pipe[f"raw/{w}"] for w in WORKERS],
        "ratio": [pipe[f"arrayrecord/{w}"] / pipe[f"geotiff/{w}"] for w in WORKERS],
        "of_plain": [pipe[f"arrayrecord/{w}"] / pipe[f"plain/{w}"] for w in WORKERS],
        "step_s": (by_side["jax"]["median_s"], by_side["torch"]["median_s"]),
        "mfu": by_side["jax"]["mfu"], "peak": steps["peak_tflops"], "peak_note": steps["peak_note"],
        "tiles_per_s": run["figures"]["sampling"]["rows"][0]["tiles_per_s"],
    }


def _held(runs: list[dict], holds) -> str:
    met = sum(bool(holds(r)) for r in runs)
    return "met" if met == len(runs) else "not met" if not met else f"met in {met} of {len(runs)} runs"


def table(runs: list[dict]) -> list[str]:
    """figure | as filed | each run | goal | status."""
    f, now = FILED, [figures_of(r) for r in runs]
    no_gpu = "GPU goal: bench/gpu.sh (no GPU lent)"
    rows = [
        ("GeoTIFF pipeline / raw rasterio reads, 0 / 1 / 2 workers", _triple(f["geotiff_share"], ".0%"),
         [_triple(n["share"], ".0%") for n in now], ">= 80% at every worker count",
         _held(now, lambda n: min(n["share"]) >= 0.8)),
        ("ArrayRecord pipeline / GeoTIFF pipeline, 0 / 1 / 2 workers",
         _triple(f["arrayrecord_ratio"], ".1f") + "x", [_triple(n["ratio"], ".1f") + "x" for n in now],
         ">= 5x",
         _held(now, lambda n: min(n["ratio"]) >= 5)),
        ("... or ArrayRecord pipeline / a plain read of its bytes", "-",
         [_triple(n["of_plain"], ".0%") for n in now], ">= 80%",
         _held(now, lambda n: min(n["of_plain"]) >= 0.8)),
        ("base flow train step, JAX vs diffusers (float32, CPU)",
         f"{f['step_s'][0]:.2f} s vs {f['step_s'][1]:.2f} s ({f['step_s'][1] / f['step_s'][0]:.2f}x)",
         [f"{n['step_s'][0]:.2f} s vs {n['step_s'][1]:.2f} s ({n['step_s'][1] / n['step_s'][0]:.2f}x)"
          for n in now], ">= 1.3x on the same GPU in bf16", no_gpu),
        ("MFU reported on CPU", f"{f['mfu']:.0%} (the CPU peak estimate was wrong)",
         [f"{n['mfu']:.1%} of {n['peak']:.2f} TFLOP/s" if n["mfu"] is not None else "none (no peak known)"
          for n in now], "a peak that is right, or none", f"peak: {now[-1]['peak_note']}"),
        ("base sampling, 4 Euler steps, tiles/s", f"{f['tiles_per_s']:.3f} on CPU",
         [f"{n['tiles_per_s']:.3f} on CPU" for n in now], ">= 100 on one H100/H200", no_gpu),
    ]
    heads = [f"run {i + 1}" for i in range(len(runs))] if len(runs) > 1 else ["now"]
    lines = ["| figure | as filed (2026-12-01) | " + " | ".join(heads) + " | goal | status |",
             "| --- | ---: | " + "".join("---: | " for _ in runs) + "--- | --- |"]
    lines += [f"| {name} | {filed} | {' | '.join(cells)} | {goal} | {status} |"
              for name, filed, cells, goal, status in rows]
    return lines


def _run_line(i: int, run: dict) -> str:
    probes, load = run["probes"], run["load"]
    seconds = ", ".join(f"{name} {run['seconds'][name]:.0f} s" for name in BENCHES)
    commit = run["figures"]["data_pipeline"].get("commit", "unknown")
    return (f"- run {i + 1}: {run['date']}, commit {commit}; {seconds}; load average {load[0]:.1f} before, "
            f"{load[1]:.1f} after; the machine's speed before -> after: a float32 768 x 3072 x 768 matmul in "
            f"JAX {probes[0]['matmul_gflops']:.0f} -> "
            f"{probes[1]['matmul_gflops']:.0f} GFLOP/s, a 256 MB copy {probes[0]['copy_gbs']:.1f} -> "
            f"{probes[1]['copy_gbs']:.1f} GB/s.")


def section(runs: list[dict]) -> str:
    commands = "; ".join(f"`python {shlex.join(argv)}`" for argv in BENCHES.values())
    return "\n".join([
        f"## {SECTION}",
        "",
        f"`python bench/headline.py --write --keep DIR` runs {commands}, one after another, each in its own "
        "process; `--report DIR,DIR,...` puts kept runs side by side. Machine: "
        f"{runs[-1]['machine']}.",
        "",
        *[_run_line(i, r) for i, r in enumerate(runs)],
        "",
        "The machine's speed is probed because it moves from one VM to the next and from day to day: the "
        "Train step notes of 2026-12-02 measured 208-215 GFLOP/s for the same matmuls on an AVX-512 VM (the "
        "MFU row names this one's vector width).",
        "",
        *table(runs),
        "",
        "The details of each figure are in the sections of the same names (Data pipeline, Train step, "
        "Sampling); this table puts them side by side.",
    ])


def measure(work: Path) -> dict:
    """Runs the benches into `work` and keeps the whole run in work/headline.json."""
    load = os.getloadavg()[0]
    before = probe()
    figures, seconds = run_benches(work)
    run = {"figures": figures, "seconds": seconds, "probes": [before, probe()],
           "load": [load, os.getloadavg()[0]], "machine": report.machine(with_devices=False, with_load=False),
           "date": datetime.date.today().isoformat()}
    (work / "headline.json").write_text(json.dumps(run, indent=2))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true",
                        help=f"write the '{SECTION}' section of BENCHMARKS.md")
    parser.add_argument("--keep", default=None,
                        help="folder for the benches' data, JSON and logs, kept (default: a temporary one)")
    parser.add_argument("--report", default=None,
                        help="measure nothing: comma-separated --keep folders of earlier runs, side by side")
    args = parser.parse_args()
    if args.report:
        runs = [json.loads((Path(d) / "headline.json").read_text()) for d in args.report.split(",")]
    elif args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        runs = [measure(Path(args.keep))]
    else:  # the data (about 0.5 GB) goes with the folder
        with tempfile.TemporaryDirectory(prefix="crrf_headline_") as work:
            runs = [measure(Path(work))]
    text = section(runs)
    print(text)
    if args.write:
        report.write_section(SECTION, text)


if __name__ == "__main__":
    main()
