"""Multi-temporal quality on held-out synthetic Sen2_MTC_New scenes: models fed T dates against each other, the
least-cloudy-date composite and the single-image references.

    python bench/temporal.py --runs "T=3=runs/demo_mt,T=1=runs/demo_mt_t1" [--scenes 48] [--size 64] [--seed 7]
                             [--steps 2] [--samples 1] [--fewer-dates] [--keep-clear 0.2] [--write]

The question it answers: does seeing several cloudy dates beat seeing one (the same training budget, the
same data, `configs/demo_mt.py:dates=1` against the default 3), and does the T-date model beat the classic
best-pixel mosaic (every pixel from its least cloudy date, `references.least_cloudy_composite`)?

1. Held-out data: `--scenes` synthetic samples of `--size` pixels in the Sen2_MTC_New layout (the test split,
   4 tiles), written with `--seed` into `<first run>/temporal_heldout_<seed>`. The demos train on seed 0, whose
   samples are seeded 0, 1, ...; seed s >= 1 seeds sample i with s * 1000003 + i, so no sample was seen in
   training. Clouds move between dates (`sen2_mtc.synthetic_sample`).
2. Each run is evaluated with `crrf_jax.evaluation.evaluate` at its own `config.data.dates` (a run with
   dates=1 sees each sample's least cloudy date). `--fewer-dates` also evaluates every multi-date run at
   1 .. T-1 dates (the least cloudy ones): one checkpoint serving any T up to its maximum.
   `--keep-clear P` also evaluates every run at its own dates with pixels whose (least-cloudy-date) cloud
   probability is below P kept as they came in (`predict_tiles(keep_clear=P)`: the composite's pixel).
3. The references come from the first multi-date run's evaluation: the composite, the cloudy input and the
   single-image fills (mean, biharmonic), all on the least cloudy date.

Prints the table; `--write` puts it into the "Multi-temporal quality on held-out synthetic scenes" section of
BENCHMARKS.md. Each evaluation's metrics.json lands in `<run>/temporal_<seed>/<dates>`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # noqa: E402 (bench/report.py, beside this script)

from crrf_jax import evaluation, rundir  # noqa: E402
from crrf_jax.data import sen2_mtc  # noqa: E402
from crrf_jax.inference import CloudRemover  # noqa: E402

TITLE = "Multi-temporal quality on held-out synthetic scenes"
TILES = ("T90AAA_R001", "T90AAB_R002", "T90AAC_R003", "T90AAD_R004")  # invented names: never a demo tile
COLUMNS = (("", "psnr"), ("", "ssim"), ("", "sam"), ("_cloudy_pixels", "psnr"), ("_cloudy_pixels", "sam"))
REFERENCES = ("least_cloudy_composite", "cloudy_input", "mean_fill", "biharmonic")


def heldout(root: Path, scenes: int, size: int, seed: int) -> Path:
    """Writes (or reuses) the held-out samples; returns their root."""
    if seed < 1:
        raise ValueError(f"--seed {seed}: seed 0 makes the demos' training samples; use a seed >= 1")
    manifest = {"scenes": scenes, "size": size, "seed": seed}
    stamp = root / "heldout.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == manifest):
        per_tile = -(-scenes // len(TILES))
        sen2_mtc.write_synthetic_sen2_mtc(root, {"test": TILES}, images_per_tile=per_tile, size=size, seed=seed)
        stamp.write_text(json.dumps(manifest))
    return root


def run_eval(name: str, workdir: Path, root: Path, dates: int, args, keep_clear: float | None = None) -> dict:
    remover = CloudRemover.from_workdir(workdir)
    t0 = time.perf_counter()
    options = {} if keep_clear is None else {"keep_clear": keep_clear}
    out = workdir / f"temporal_{args.seed}" / (str(dates) + ("" if keep_clear is None else f"_keep{keep_clear}"))
    result = evaluation.evaluate(
        remover, root=str(root), out=str(out), split="test", steps=args.steps, num_samples=args.samples,
        batch_size=args.batch_size, dataset="sen2_mtc_new", dates=dates, write_examples=False, **options,
    )
    print(f"{name} at {dates} date(s): {result['num_images']} images, {time.perf_counter() - t0:.0f} s")
    return result


def row(label: str, groups: dict) -> str:
    cells = []
    for suffix, metric in COLUMNS:
        value = groups.get(suffix, {}).get(metric)
        cells.append("n/a" if value is None else f"{value:.3f}" if metric == "ssim" else f"{value:.2f}")
    return f"| {label} | " + " | ".join(cells) + " |"


def method_groups(result: dict, method: str) -> dict:
    return {suffix: result[method + suffix] for suffix, _ in COLUMNS if method + suffix in result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="comma-separated label=workdir (a label may hold '=')")
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: each run's)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fewer-dates", action="store_true", help="also every multi-date run at 1 .. T-1 dates")
    p.add_argument("--keep-clear", type=float, default=None, help="also each run with this keep_clear")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    runs = [(label, Path(path)) for label, path in (item.rsplit("=", 1) for item in args.runs.split(","))]
    root = heldout(runs[0][1] / f"temporal_heldout_{args.seed}", args.scenes, args.size, args.seed)
    rows, refs = [], None
    for label, workdir in runs:
        dates = int(rundir.load_run_config(workdir).data.get("dates", 1))
        for d in (range(dates, 0, -1) if args.fewer_dates else [dates]):
            result = run_eval(label, workdir, root, d, args)
            rows.append(row(f"{label}, fed {d} date{'s' if d > 1 else ''}", method_groups(result, "model")))
            if refs is None and d > 1:
                refs = result
        if args.keep_clear is not None:
            result = run_eval(label, workdir, root, dates, args, args.keep_clear)
            rows.append(row(f"{label}, fed {dates} date{'s' if dates > 1 else ''}, keep_clear {args.keep_clear}",
                            method_groups(result, "model")))
    header = "| method | PSNR | SSIM | SAM | PSNR cloudy px | SAM cloudy px |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    if refs is not None:
        rows += [row(f"{m} (learning-free)", method_groups(refs, m)) for m in REFERENCES if m in refs]
    command = "python bench/temporal.py " + " ".join(sys.argv[1:])
    text = (f"## {TITLE}\n\n`{command}`\n\n{datetime.date.today()}, {report.machine()}. {args.scenes} held-out "
            f"samples of {args.size} x {args.size} pixels (seed {args.seed}, 3 cloudy dates each, moving clouds), "
            f"{args.samples} sample(s) per image. The cloudy input and the single-image references are the least "
            "cloudy date's; 'cloudy px' are the pixels cloudy on that date.\n\n" + header + "\n" + "\n".join(rows))
    print(text)
    if args.write:
        report.write_section(TITLE, text)


if __name__ == "__main__":
    main()
