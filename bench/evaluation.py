"""Evaluation's host work: seconds of `evaluation.evaluate` with the references in one thread or side by side,
and with the model's batch waited for before or after them.

    python bench/evaluation.py [--n 32] [--size 256] [--batch 8] [--model tiny,device] [--device-rate 100]
                               [--rounds 2] [--write] [--section NAME]

The data: `--n` synthetic SEN12MS-CR scenes of `--size` pixels (13-band S2, S1, s2cloudless cloud maps), all
scored (split "all") in batches of `--batch`, with both references (mean fill, biharmonic inpainting).
The models: "tiny", the tiny variant with random weights sampling 1 Euler step on JAX's devices here (on a
CPU, the same cores the references use); "device", the sampler replaced by an identity whose results arrive
as from a device sampling `--device-rate` tiles/s (it sleeps until then, leaving the CPU to the host, as a
GPU would: bench/simulated_device.py, in this process).
The host settings, each run in turn in this process, `--rounds` times, after a warm-up run of each model:
"serial" one reference thread, the model's batch waited for before the references (what a CPU run does by
default, and every run before the reference threads); "threads" the references on all cores
(`reference_threads`, the default); "overlap" that and the references computed while the batch samples
(`overlap=True`, the default on an accelerator). Each run's per_image.csv must equal the serial one's:
the settings change seconds, never a figure.
`--write` puts the table into the "Evaluation: host work" section of BENCHMARKS.md (or --section's).
Older code, whose `evaluate` has neither keyword, runs "serial" alone (its only way); `--csv DIR` keeps each
model's serial per_image.csv there, to compare codes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import report  # noqa: E402 (bench/report.py, beside this script)
import sampling as sampling_bench  # noqa: E402 (bench/sampling.py: random-weight removers)
import simulated_device  # noqa: E402 (bench/simulated_device.py)

from crrf_jax import evaluation  # noqa: E402
from crrf_jax.data import cloudprob, synthetic  # noqa: E402

SETTINGS = {"serial": {"reference_threads": 1, "overlap": False},
            "threads": {"reference_threads": None, "overlap": False},
            "overlap": {"reference_threads": None, "overlap": True}}


def run(remover, root: Path, out: Path, batch: int, setting: str) -> dict:
    keywords = inspect.signature(evaluation.evaluate).parameters
    options = {k: v for k, v in SETTINGS[setting].items() if k in keywords}  # older code: "serial", as it was
    t0 = time.perf_counter()
    result = evaluation.evaluate(remover, root=str(root), out=str(out), split="all", steps=1,
                                 batch_size=batch, write_examples=False, **options)
    return {"wall": time.perf_counter() - t0, "images": result["num_images"], "wall_s": result["wall_s"],
            "threads": result.get("reference_threads", 1), "csv": (out / "per_image.csv").read_text()}


def measure(model: str, remover, root: Path, scratch: Path, args) -> list[dict]:
    """Every setting `--rounds` times, interleaved, after a warm-up (compiling) run."""
    device = model == "device"
    context = simulated_device.device_at(args.device_rate) if device else contextlib.nullcontext()
    keywords = inspect.signature(evaluation.evaluate).parameters
    settings = [name for name, kw in SETTINGS.items() if set(kw) <= set(keywords) or name == "serial"]
    rows = []
    with context:
        run(remover, root, scratch / "warm", args.batch, "serial")
        if args.csv:
            Path(args.csv).mkdir(parents=True, exist_ok=True)
            shutil.copy(scratch / "warm" / "per_image.csv", Path(args.csv) / f"{model}.csv")
        for r in range(args.rounds):
            for setting in settings:
                rows.append({"model": model, "setting": setting, "round": r + 1,
                             **run(remover, root, scratch / f"{model}_{setting}_{r}", args.batch, setting)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "csv"}), flush=True)
    serial = rows[0]["csv"]
    for row in rows:
        row["same"] = row["csv"] == serial
    return rows


def score_seconds(batch: int, size: int, repeats: int = 3) -> float:
    """Best seconds of `evaluation.score_methods` on a batch of four methods' random 13-band images (every
    metric over all, cloudy and clear pixels: what each eval batch costs beyond the model and references)."""
    rng = np.random.default_rng(0)
    target = rng.random((batch, size, size, 13), dtype=np.float32)
    methods = {name: np.clip(target + 0.05 * rng.standard_normal(target.shape, np.float32), 0, 1)
               for name in ("model", "cloudy_input", "mean_fill", "biharmonic")}
    prob = rng.random((batch, size, size, 1), dtype=np.float32)
    times = []
    for _ in range(repeats + 1):  # the first compiles
        t0 = time.perf_counter()
        evaluation.score_methods(methods, target, prob)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def format_table(rows: list[dict], args) -> str:
    head = ("| model | host setting | round | reference threads | wall s | images/s | model s | mean_fill s "
            "| biharmonic s | per_image.csv as serial |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n")
    model_names = {"tiny": "tiny, 1 step (this host's devices)",
                   "device": f"device at {args.device_rate:g} tiles/s"}
    return head + "\n".join(
        f"| {model_names[r['model']]} | {r['setting']} | {r['round']} | {r['threads']} | {r['wall']:.2f} | "
        f"{r['images'] / r['wall']:.1f} | {r['wall_s']['model']:.2f} | {r['wall_s']['mean_fill']:.2f} | "
        f"{r['wall_s']['biharmonic']:.2f} | {'yes' if r['same'] else 'NO'} |" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="tiny,device")
    parser.add_argument("--device-rate", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--section", default="Evaluation: host work")
    parser.add_argument("--csv", default="")
    args = parser.parse_args()
    models = args.model.split(",")
    if not set(models) <= {"tiny", "device"}:
        raise SystemExit(f"--model: tiny and/or device, got {args.model!r}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        synthetic.write_synthetic_dataset(root, n_scenes=args.n, size=args.size, seed=0)
        cloudprob.compute_cloud_probs(root, workers=0, progress=False)
        remover = sampling_bench.random_remover("tiny", "float32")
        rows = [row for model in models for row in measure(model, remover, root, Path(tmp), args)]
    scoring = score_seconds(args.batch, args.size)
    command = "python bench/evaluation.py " + " ".join(sys.argv[1:])
    text = (f"## {args.section}\n\nCommand: `{command.strip()}`\nMachine: {report.machine()}, "
            f"{len(os.sched_getaffinity(0))} cores for this process\n"
            f"Date: {datetime.date.today().isoformat()}\n"
            f"Data: {args.n} synthetic {args.size}x{args.size} scenes, batches of {args.batch}, both "
            f"references. Scoring a batch of four methods (`evaluation.score_methods`, best of 3): "
            f"{scoring:.2f} s.\n\n{format_table(rows, args)}\n")
    print(text)
    if args.write:
        report.write_section(args.section, text)
    if not all(row["same"] for row in rows):
        raise SystemExit("a host setting changed per_image.csv")


if __name__ == "__main__":
    main()
