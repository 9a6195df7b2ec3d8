"""Quality on held-out scenes: the model against learning-free and learned references, ablations and sweeps.

    python bench/quality.py --workdir=runs/demo [--bundle DIR] [--scenes 12] [--size 64] [--seed 7]
                            [--steps 1,2,4,8] [--guidance 1,1.5,2,3] [--real] [--write] [--title "..."]

The issue it answers: the model must beat every learning-free baseline on scenes it has never seen.

1. Held-out data: `--scenes` synthetic scenes of `--size` pixels written with `--seed` into
   `<workdir>/quality_heldout_<seed>` (the demo trains on seed 0, whose scenes are seeded 0..47; seed s >= 1
   seeds scene i with s * 1000003 + i, so no scene was seen in training), with their cloud probabilities
   (s2cloudless). `--real` uses a temporary copy of the real SEN12MS-CR sample
   (../shared/data/sen12mscr_sample beside the repository) instead: mechanics only, 2 patches.
2. References, scored like the model by `crrf_jax.evaluation` over all, cloudy and clear pixels: the cloudy
   input, a per-band mean fill and a biharmonic inpainting (`crrf_jax.references`, learning-free), and a
   learned one: a per-pixel SAR regression (one gradient-boosted tree ensemble per band on SAR VV/VH, their
   5x5 and 11x11 local means and the cloud probability) fitted on the run's training split and applied to the
   cloudy pixels only (`sar_regression_reference`).
   The latent ceiling, scored the same way (`vae_roundtrip_reference`): the model's own S2 autoencoder
   round-trips the clear target ("vae_roundtrip_clear": the best any latent model can do before the refiner)
   and the cloudy input ("vae_roundtrip_cloudy").
3. Ablations of the model (SAR dropped, cloud probability zeroed, cloudy tokens dropped, the flow's output
   without the refiner, the refiner on the cloudy image's VAE round trip), an Euler-step sweep and a guidance
   sweep. Options the model or today's `predict_tiles` lacks are reported as n/a.

Prints the tables; `--write` puts them into the "Quality on held-out synthetic scenes" section of BENCHMARKS.md
(`--title` for another section). Each evaluation's metrics.json lands in `<workdir>/quality_<seed>/<setting>`.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # noqa: E402 (bench/report.py, beside this script)

from crrf_jax import bundle, evaluation, rundir, sampling  # noqa: E402
from crrf_jax import metrics as M  # noqa: E402
from crrf_jax import references as R  # noqa: E402
from crrf_jax.data import cloudprob, pipeline, sen12mscr, synthetic  # noqa: E402

REAL_SAMPLE = REPO.parent / "shared" / "data" / "sen12mscr_sample"
LEARNING_FREE = ("cloudy_input", *R.REFERENCES)
SAR_REGRESSION = "sar_regression"
VAE_CLEAR, VAE_CLOUDY = "vae_roundtrip_clear", "vae_roundtrip_cloudy"
# Markdown columns: (header, group suffix, metric).
COLUMNS = (
    ("PSNR", "", "psnr"), ("SSIM", "", "ssim"), ("SAM", "", "sam"),
    ("PSNR cloudy", "_cloudy_pixels", "psnr"), ("SSIM cloudy", "_cloudy_pixels", "ssim"),
    ("SAM cloudy", "_cloudy_pixels", "sam"), ("SAM clear", "_clear_pixels", "sam"),
)
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "sam": False, "mae": False, "rmse": False}


# ------------------------------------------------------------------------------------------------------------
# Held-out data
# ------------------------------------------------------------------------------------------------------------


def heldout_scenes(workdir: str, n_scenes: int, size: int, seed: int) -> str:
    """Writes (or reuses) `n_scenes` synthetic scenes with their cloud probabilities; returns their root.

    The root is `<workdir>/quality_heldout_<seed>`; a manifest records (scenes, size, seed), and a root written
    with other settings is rewritten (a stale cloud-probability cache would otherwise survive).
    """
    if seed < 1:
        raise ValueError(f"--seed {seed}: seed 0 makes the demo's training scenes; use a seed >= 1")
    root = Path(workdir) / f"quality_heldout_{seed}"
    manifest = {"scenes": n_scenes, "size": size, "seed": seed}
    stamp = root / "heldout.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == manifest):
        shutil.rmtree(root, ignore_errors=True)
        synthetic.write_synthetic_dataset(root, n_scenes=n_scenes, size=size, seed=seed)
        cloudprob.compute_cloud_probs(root, workers=1, progress=False)
        stamp.write_text(json.dumps(manifest))
    return str(root)


def real_sample_copy() -> str | None:
    """A temporary copy (outside the repository) of the real sample with its cloud probabilities, or None."""
    if not REAL_SAMPLE.is_dir():
        return None
    root = Path(tempfile.mkdtemp(prefix="crrf_quality_real_")) / "sen12mscr_sample"
    shutil.copytree(REAL_SAMPLE, root)  # the cloud-probability cache is written beside the data
    cloudprob.compute_cloud_probs(root, workers=1, progress=False)
    return str(root)


def images(source: str, root: str | None, data_dir: str | None, split: str, protocol: str,
           bands: Sequence[int], batch_size: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """The images of a split one by one: "s1" (H, W, 2), "s2", "s2_cloudy" (H, W, C), "cloud_prob" (H, W, 1)."""
    dataset = pipeline.make_dataset(source=source, root=root, data_dir=data_dir, split=split, protocol=protocol,
                                    bands=list(bands), batch_size=batch_size, crop_size=None, shuffle=False,
                                    num_epochs=1, drop_remainder=False, to_float32=True)
    for batch in dataset:
        for i in np.flatnonzero(np.asarray(batch["mask"], bool)):
            yield {k: np.asarray(batch[k][i], np.float32) for k in ("s1", "s2", "s2_cloudy", "cloud_prob")}


# ------------------------------------------------------------------------------------------------------------
# The learned reference: per-pixel SAR regression
# ------------------------------------------------------------------------------------------------------------


def sar_features(s1: np.ndarray, cloud_prob: np.ndarray) -> np.ndarray:
    """Per-pixel features of an image: (H, W, 2) SAR and (H, W, 1) cloud probability on [0, 1] -> (H*W, 7).

    Columns: VV, VH, their 5x5 local means, their 11x11 local means (reflected at the border), cloud prob.
    """
    from scipy.ndimage import uniform_filter

    s1 = np.asarray(s1, np.float32)
    local = [uniform_filter(s1, size=(k, k, 1), mode="reflect") for k in (5, 11)]
    features = np.concatenate([s1, *local, np.asarray(cloud_prob, np.float32).reshape(*s1.shape[:2], 1)], -1)
    return features.reshape(-1, features.shape[-1])


@dataclass
class SarRegression:
    """One HistGradientBoostingRegressor per band, from `sar_features` to cloud-free reflectance."""

    models: list
    num_pixels: int
    num_images: int
    fit_s: float

    def predict(self, s1: np.ndarray, cloud_prob: np.ndarray) -> np.ndarray:
        """(H, W, 2) SAR, (H, W, 1) cloud probability -> (H, W, C) reflectance clipped to [0, 1]."""
        x = sar_features(s1, cloud_prob)
        bands = np.stack([m.predict(x) for m in self.models], axis=-1)
        return np.clip(bands, 0.0, 1.0).astype(np.float32).reshape(*s1.shape[:2], len(self.models))


def fit_sar_regression(train_images: Iterator[Mapping[str, np.ndarray]], *, max_pixels: int = 200_000,
                       pixels_per_image: int = 4096, seed: int = 0) -> SarRegression:
    """Fits the SAR regression on up to `pixels_per_image` random pixels of every training image (then at most
    `max_pixels` of them, drawn at random); targets are the cloud-free images "s2" (H, W, C)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for image in train_images:
        x = sar_features(image["s1"], image["cloud_prob"])
        take = rng.choice(len(x), min(pixels_per_image, len(x)), replace=False)
        xs.append(x[take])
        ys.append(image["s2"].reshape(len(x), -1)[take])
    if not xs:
        raise ValueError("fit_sar_regression: the training split has no images")
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) > max_pixels:
        keep = rng.choice(len(x), max_pixels, replace=False)
        x, y = x[keep], y[keep]
    t0 = time.perf_counter()
    models = [HistGradientBoostingRegressor(random_state=seed).fit(x, y[:, b]) for b in range(y.shape[1])]
    return SarRegression(models, len(x), len(xs), time.perf_counter() - t0)


def sar_regression_reference(regression: SarRegression, heldout: Iterator[Mapping[str, np.ndarray]], *,
                             threshold: float = 0.5, name: str = SAR_REGRESSION) -> dict[str, Any]:
    """Scores the regression on held-out images: cloudy pixels predicted from SAR, clear ones kept from the
    cloudy input. Returns evaluation groups `name`, `name`_cloudy_pixels, `name`_clear_pixels (means over
    images) and their "image_counts"."""
    running = {group: M.RunningMean() for group in evaluation.method_groups(name)}
    for image in heldout:
        pred = image["s2_cloudy"].copy()
        cloudy = R.cloud_mask(image["cloud_prob"], threshold)
        if cloudy.any():
            pred[cloudy] = regression.predict(image["s1"], image["cloud_prob"])[cloudy]
        scores = evaluation.score_methods({name: pred[None]}, image["s2"][None], image["cloud_prob"][None],
                                          threshold)
        for group, acc in running.items():
            acc.update(scores[group])
    return evaluation.summarize(running)


# ------------------------------------------------------------------------------------------------------------
# The latent ceiling: the S2 autoencoder's round trip
# ------------------------------------------------------------------------------------------------------------


def vae_roundtrip(vae, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """decode(encode(x)) of an NNX AutoEncoder (latent statistics included) on (N, H, W, C) reflectance on
    [0, 1] -> (N, H, W, C) float32 clipped to [0, 1].

    Runs in batches of `batch_size` (the last one padded, so one compiled shape serves them all); H and W are
    reflect-padded up to a multiple of the autoencoder's downsample factor and cropped back.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"vae_roundtrip: images must be (N, H, W, C), got shape {images.shape}")
    n, h, w, _ = images.shape
    f = vae.config.downsample_factor
    pad = ((0, 0), (0, -h % f), (0, -w % f), (0, 0))
    padded = np.pad(images, pad, mode="reflect") if any(p[1] for p in pad) else images
    graph, state = nnx.split(vae)
    out = []
    for start in range(0, n, batch_size):
        chunk = padded[start:start + batch_size]
        fill = batch_size - len(chunk)
        if fill:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fill, axis=0)])
        roundtrip = sampling.vae_roundtrip_jit(graph, state, jnp.asarray(chunk))
        out.append(np.clip(np.asarray(roundtrip), 0.0, 1.0)[:batch_size - fill])
    return np.concatenate(out)[:, :h, :w].astype(np.float32)


def vae_roundtrip_reference(vae, heldout: Iterator[Mapping[str, np.ndarray]], *, threshold: float = 0.5,
                            batch_size: int = 8) -> dict[str, Any]:
    """Scores the S2 autoencoder's round trips of held-out images against their cloud-free targets: of the
    target itself (VAE_CLEAR, the latent ceiling) and of the cloudy input (VAE_CLOUDY). Returns their
    evaluation groups (means over images), "image_counts" and "wall_s" {"vae_roundtrip": host seconds of
    both}."""
    running = {group: M.RunningMean() for name in (VAE_CLEAR, VAE_CLOUDY)
               for group in evaluation.method_groups(name)}
    t0 = time.perf_counter()

    def flush(batch: list[Mapping[str, np.ndarray]]) -> None:
        stack = {k: np.stack([image[k] for image in batch]) for k in ("s2", "s2_cloudy", "cloud_prob")}
        preds = {VAE_CLEAR: vae_roundtrip(vae, stack["s2"], batch_size),
                 VAE_CLOUDY: vae_roundtrip(vae, stack["s2_cloudy"], batch_size)}
        scores = evaluation.score_methods(preds, stack["s2"], stack["cloud_prob"], threshold)
        for group, acc in running.items():
            acc.update(scores[group])

    batch: list[Mapping[str, np.ndarray]] = []
    for image in heldout:  # consecutive images of one shape go through together
        if batch and (len(batch) == batch_size or image["s2"].shape != batch[0]["s2"].shape):
            flush(batch)
            batch = []
        batch.append(image)
    if batch:
        flush(batch)
    if not running[VAE_CLEAR].num_images:
        raise ValueError("vae_roundtrip_reference: no held-out images")
    return evaluation.summarize(running) | {"wall_s": {"vae_roundtrip": time.perf_counter() - t0}}


def add_method(result: dict[str, Any], groups: Mapping[str, Any]) -> None:
    """Merges another method's groups (from `sar_regression_reference`, `vae_roundtrip_reference`) into an
    evaluation result; "image_counts" and "wall_s" are merged key by key."""
    for key, value in groups.items():
        if key in ("image_counts", "wall_s"):
            result.setdefault(key, {}).update(value)
        else:
            result[key] = value


# ------------------------------------------------------------------------------------------------------------
# Model settings
# ------------------------------------------------------------------------------------------------------------


def accepts(remover, option: str) -> bool:
    """Whether remover.predict_tiles takes the keyword `option` (its options are submit_tiles's where that
    exists: older code has predict_tiles alone)."""
    return option in inspect.signature(getattr(remover, "submit_tiles", remover.predict_tiles)).parameters


def ablations(remover) -> list[tuple[str, dict[str, Any] | None, str]]:
    """(label, evaluate kwargs or None when not applicable, why not) of every ablation."""
    refiner = getattr(remover, "has_refiner", False)
    return [
        ("SAR dropped", {"use_sar": False} if remover.trained_with_sar else None, "trained without SAR"),
        ("cloud probability zeroed", {"zero_cloud_prob": True}, ""),
        ("cloudy tokens dropped", {"drop_cloudy": True} if accepts(remover, "drop_cloudy") else None,
         "predict_tiles has no drop_cloudy option"),
        ("flow output only (no refiner)", {"output": "flow"} if refiner else None, "no refiner"),
        ("refiner on the cloudy VAE round trip", {"output": "roundtrip_refined"} if refiner else None,
         "no refiner"),
    ]


class Evaluations:
    """Runs `evaluation.evaluate` per setting, once per distinct setting; each one writes into out/<slug>."""

    def __init__(self, remover, root: str, out: str, threshold: float = 0.5):
        self.remover, self.root, self.out, self.threshold = remover, root, out, threshold
        self.defaults = {"steps": int(remover.config["sampling"]["steps"]),
                         "guidance_scale": float(remover.config["sampling"]["guidance_scale"])}
        self.cache: dict[str, dict[str, Any]] = {}

    def __call__(self, references: bool = False, **setting: Any) -> dict[str, Any]:
        setting = self.defaults | setting
        slug = "_".join(f"{k}-{v}" for k, v in sorted(setting.items()))
        if slug not in self.cache or (references and "mean_fill" not in self.cache[slug]):
            t0 = time.perf_counter()
            result = evaluation.evaluate(
                self.remover, root=self.root, out=os.path.join(self.out, slug), split="all", num_samples=1,
                batch_size=8, cloud_threshold=self.threshold, references=references, write_examples=False,
                **setting,
            )
            result["bench_s"] = time.perf_counter() - t0
            print(f"  {slug}: model PSNR {result['model']['psnr']:.2f} dB, cloudy-pixel PSNR "
                  f"{result['model_cloudy_pixels']['psnr']:.2f} dB ({result['bench_s']:.0f} s)", flush=True)
            self.cache[slug] = result
        return self.cache[slug]


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def _cell(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if metric == "ssim" else f"{value:.2f}"


def groups(result: Mapping[str, Any], method: str = "model") -> dict[str, Mapping[str, float]]:
    """{group suffix: metrics} of one method of an evaluation result."""
    return {suffix: result[method + suffix] for suffix in evaluation.GROUP_SUFFIXES if method + suffix in result}


def markdown_table(first: str, rows: Sequence[tuple[str, Mapping[str, Any] | None]],
                   delta_to: Mapping[str, Any] | None = None) -> list[str]:
    """A markdown table: rows of (label, `groups(...)` of a method, or None for "n/a"), the COLUMNS metrics;
    `delta_to` (groups) adds each row's cloudy-pixel PSNR minus its."""
    heads = [first, *(c[0] for c in COLUMNS)] + (["Δ PSNR cloudy"] if delta_to else [])
    lines = ["| " + " | ".join(heads) + " |", "| --- |" + " ---: |" * (len(heads) - 1)]
    for label, row in rows:
        if row is None:
            cells = ["n/a"] * (len(heads) - 1)
        else:
            cells = [_cell(row.get(suffix, {}).get(metric), metric) for _, suffix, metric in COLUMNS]
            if delta_to:
                cells.append(f"{row['_cloudy_pixels']['psnr'] - delta_to['_cloudy_pixels']['psnr']:+.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def shortfalls(result: Mapping[str, Any], rivals: Sequence[str], method: str = "model") -> list[str]:
    """Where `method` does not beat the best of `rivals`: "<column> (best: <rival> <value>)" for each of
    PSNR / SSIM / SAM over all and cloudy pixels."""
    misses = []
    for header, suffix, metric in COLUMNS:
        if suffix == "_clear_pixels":
            continue
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        present = [r for r in rivals if r + suffix in result]
        best = max(present, key=lambda r: sign * result[r + suffix][metric])
        ours, theirs = result[method + suffix][metric], result[best + suffix][metric]
        if not sign * ours > sign * theirs:
            misses.append(f"{header} (best: {best} {_cell(theirs, metric)})")
    return misses


def latent_ceiling(result: Mapping[str, Any]) -> str:
    """One sentence on the VAE round-trip rows (`vae_roundtrip_reference`), or "" when the result has none."""
    if VAE_CLEAR not in result:
        return ""

    def at(method: str, suffix: str = "") -> str:
        row = result.get(method + suffix, {})
        return f"{_cell(row.get('psnr'), 'psnr')} dB / {_cell(row.get('sam'), 'sam')} deg SAM"

    text = (f"Latent ceiling: the S2 VAE round-trips the clear held-out targets at {at(VAE_CLEAR)} "
            f"({at(VAE_CLEAR, '_cloudy_pixels')} over the cloudy pixels): the flow's decoded output cannot be "
            f"better than that; the refiner can.")
    if VAE_CLOUDY in result:
        text += f" Round-tripping the cloudy input instead gives {at(VAE_CLOUDY)}"
        if "cloudy_input" in result:
            text += f" (the cloudy input itself: {at('cloudy_input')})"
        text += "."
    return text


def verdict(result: Mapping[str, Any], rivals: Sequence[str], what: str) -> str:
    misses = shortfalls(result, rivals)
    if not misses:
        return f"The model beats every {what} on PSNR, SSIM and SAM over all and over cloudy pixels."
    return f"The model does **not** beat every {what} on: " + "; ".join(misses) + "."


def run_config(workdir: str):
    """The run's training config (rundir.load_run_config), or None when the workdir has none."""
    try:
        return rundir.load_run_config(workdir)
    except bundle.BundleError:
        return None


def config_summary(run, remover, model_source: str) -> str:
    """Variant, flow source, refiner on/off, SAR, training steps and sampling defaults of the evaluated model
    (`run`: its training config, or None)."""
    parts = [f"`{model_source}`", f"variant `{remover.config.get('model', {}).get('variant', '?')}`"]
    flow = run.get("flow") if run is not None else None
    if flow is not None and flow.get("source") is not None:
        sigma = f" (sigma {flow.source_sigma:g})" if flow.get("source_sigma") is not None else ""
        parts.append(f"flow source `{flow.source}`{sigma}")
    if flow is not None and flow.get("steps") is not None:
        parts.append(f"{flow.steps} flow training steps")
    parts.append("refiner " + ("on" if getattr(remover, "has_refiner", False) else "off"))
    parts.append("SAR " + ("used" if remover.trained_with_sar else "not used"))
    sampling = remover.config["sampling"]
    parts.append(f"sampling defaults {sampling['steps']} steps, guidance {sampling['guidance_scale']:g}")
    return ", ".join(parts)


def build_report(title: str, command: str, setting: str, data: str, default: Mapping[str, Any],
                 regression: SarRegression, ablation_rows, steps_rows, guidance_rows, elapsed_s: float,
                 start_load: float) -> str:
    """The BENCHMARKS.md section: how it was run, on what, and the methods / ablations / sweep tables."""
    methods = [(name, groups(default, name)) for name in evaluation.method_names(default)]
    rows_seconds = ", ".join(f"{k} {v:.1f} s" for k, v in default.get("wall_s", {}).items())
    counts = default["image_counts"]
    lines = [
        f"## {title}",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}, {elapsed_s / 60:.1f} min in all)",
        "",
        f"Machine: {report.machine()}. Load average at the start: {start_load:.1f}.",
        f"Model: {setting}.",
        f"Data: {data}; {default['num_images']} images ({counts['model_cloudy_pixels']['psnr']} with cloudy "
        f"pixels, {counts['model_clear_pixels']['psnr']} with clear ones), mean cloud fraction "
        f"{default['mean_cloud_fraction']:.2f} (cloud probability > {default['cloud_threshold']:g}). "
        f"Model scored with {default['steps']} Euler steps, guidance {default['guidance_scale']:g}, 1 sample; "
        f"predictions clipped to [0, 1]; means over images, an image without cloudy (clear) pixels left out of "
        f"the cloudy (clear) columns.",
        f"SAR regression: one gradient-boosted regressor per band on SAR VV/VH, their 5x5 and 11x11 means and "
        f"the cloud probability, fitted on {regression.num_pixels} pixels of {regression.num_images} training "
        f"images in {regression.fit_s:.0f} s, applied to cloudy pixels only. Host time of the default run: "
        f"{rows_seconds}.",
        "",
        "### Methods",
        "",
        *markdown_table("method", methods),
        "",
        *([latent_ceiling(default), ""] if VAE_CLEAR in default else []),
        verdict(default, LEARNING_FREE, "learning-free reference (cloudy input, mean fill, biharmonic)"),
        verdict(default, [SAR_REGRESSION], "learned reference (SAR regression)"),
        "",
        "### Ablations (model)",
        "",
        *markdown_table("setting", [("default", groups(default)), *ablation_rows], delta_to=groups(default)),
        "",
        "### Euler steps (model)",
        "",
        *markdown_table("steps", steps_rows),
        "",
        "### Guidance scale (model)",
        "",
        *markdown_table("guidance", guidance_rows),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def _label(value: float, default: float) -> str:
    return f"{value:g}" + (" (default)" if value == default else "")


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished training run")
    parser.add_argument("--bundle", default=None, help="evaluate this bundle instead of the run's weights")
    parser.add_argument("--train_root", default=None, help="SAR regression data (default: the run's data root)")
    parser.add_argument("--scenes", type=int, default=12, help="held-out synthetic scenes")
    parser.add_argument("--size", type=int, default=64, help="their size in pixels")
    parser.add_argument("--seed", type=int, default=7, help="their seed (>= 1; the demo trains on seed 0)")
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated Euler step counts to sweep")
    parser.add_argument("--guidance", default="1,1.5,2,3", help="comma-separated guidance scales to sweep")
    parser.add_argument("--cloud_threshold", type=float, default=0.5, help="cloud probability of a cloudy pixel")
    parser.add_argument("--max_pixels", type=int, default=200_000, help="SAR regression training pixels")
    parser.add_argument("--real", action="store_true", help="the real SEN12MS-CR sample instead (mechanics)")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    parser.add_argument("--title", default=None, help="BENCHMARKS.md section title")
    args = parser.parse_args()
    t_start, start_load = time.perf_counter(), os.getloadavg()[0]

    from absl import logging as absl_logging

    from crrf_jax.inference import CloudRemover

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's per-array INFO lines
    run = run_config(args.workdir)
    if run is None and not (args.bundle and args.train_root):
        parser.error(f"{args.workdir} has no training config.json: give --bundle and --train_root")
    temp = None
    if args.real:
        root = temp = real_sample_copy()
        if root is None:
            print(f"--real: no real sample at {REAL_SAMPLE}; nothing to do")
            return
        data = f"the real SEN12MS-CR sample ({REAL_SAMPLE.name}, {len(sen12mscr.find_triplets(root, 'all'))} "\
               "patches)"
        out = os.path.join(args.workdir, "quality_real")
        title = args.title or "Quality on the real SEN12MS-CR sample"
    else:
        root = heldout_scenes(args.workdir, args.scenes, args.size, args.seed)
        data = (f"{args.scenes} held-out synthetic {args.size}x{args.size} scenes (seed {args.seed}, scene seeds "
                f"{args.seed * 1_000_003}..{args.seed * 1_000_003 + args.scenes - 1})")
        out = os.path.join(args.workdir, f"quality_{args.seed}")
        title = args.title or "Quality on held-out synthetic scenes"
    try:
        remover = (CloudRemover.from_bundle(args.bundle) if args.bundle else CloudRemover.from_workdir(args.workdir))
        setting = config_summary(run, remover, args.bundle or args.workdir)
        print(f"model: {setting}\ndata: {data} in {root}", flush=True)
        run_eval = Evaluations(remover, root, out, args.cloud_threshold)
        default = run_eval(references=True)

        print("fitting the SAR regression on the training split ...", flush=True)
        bands = remover.band_indices
        data_cfg = run.data if run is not None else {"source": "geotiff", "protocol": "exact"}
        source = "geotiff" if args.train_root else data_cfg["source"]
        train = images(source, args.train_root or data_cfg.get("root"), data_cfg.get("tfds_data_dir") or None,
                       "train", data_cfg["protocol"], bands)
        regression = fit_sar_regression(train, max_pixels=args.max_pixels, seed=args.seed)
        heldout = images("geotiff", root, None, "all", "exact", bands)
        add_method(default, sar_regression_reference(regression, heldout, threshold=args.cloud_threshold))
        print("VAE round trips (the latent ceiling) ...", flush=True)
        heldout = images("geotiff", root, None, "all", "exact", bands)
        add_method(default, vae_roundtrip_reference(remover.nets.vae_s2(), heldout,
                                                    threshold=args.cloud_threshold))
        print("\n" + evaluation.format_table(default) + "\n", flush=True)

        ablation_rows = [(label, groups(run_eval(**kw))) if kw is not None else (f"{label} (n/a: {why})", None)
                         for label, kw, why in ablations(remover)]
        steps_rows = [(_label(s, run_eval.defaults["steps"]), groups(run_eval(steps=s))) for s in _ints(args.steps)]
        guidance_rows = [(_label(g, run_eval.defaults["guidance_scale"]), groups(run_eval(guidance_scale=g)))
                         for g in _floats(args.guidance)]
    finally:
        if temp:
            shutil.rmtree(Path(temp).parent, ignore_errors=True)

    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    text = build_report(title, command.strip(), setting, data, default, regression, ablation_rows, steps_rows,
                        guidance_rows, time.perf_counter() - t_start, start_load)
    print(text)
    if args.write:
        report.write_section(title, text)


if __name__ == "__main__":
    main()
