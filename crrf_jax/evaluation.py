"""Evaluation comparable with the published SEN12MS-CR tables (UnCRtainTS, EMRDM; docs/ARCHITECTURE.md,
"Inference and evaluation").

`evaluate(remover, ...)` samples every image of a split with the EMA weights (tiles batched over the
remover's mesh: every device of every process) and scores, against the cloud-free target, the model, the
cloudy input and the learning-free references of `crrf_jax.references` (mean fill, biharmonic inpainting): the
baselines a model has to beat. Every method is scored over all pixels, over cloudy pixels (cloud probability
above a threshold) and over clear pixels (the rest), and `evaluate` writes into `out`:

    metrics.json     means over images of every group, how many images each mean averaged, split, protocol,
                     sampling and predict options
    per_image.csv    one row per image (the model's metrics unprefixed, every other group as "<group>/<metric>")
    examples_{worst,median,best}.png   cloudy RGB | SAR | prediction | target | uncertainty, ranked by PSNR
    predictions/<id>.tif   (optional) 13-band uint16 GeoTIFFs with the target's georeferencing

The groups of a method are `<method>`, `<method>_cloudy_pixels` and `<method>_clear_pixels`, e.g. `model`,
`cloudy_input_cloudy_pixels`, `biharmonic_clear_pixels`. An image without cloudy (or clear) pixels has NaN
metrics in that group and is left out of its mean (`metrics.RunningMean`); `image_counts` says how many images
each mean is over. The references keep clear pixels exactly, so their clear-pixel scores are the cloudy
input's.

With several processes (jax.distributed) every process calls `evaluate` alike: each reads the whole split,
feeds its devices' part of each batch, gets the gathered predictions back, and scores them; process 0 alone
writes the files. The result is the one-process result.

Predictions are clipped to [0, 1] before scoring (the published code scores unclipped outputs; metrics.json says
`clipped_to_unit_range`). Each image's sampling noise is seeded by a hash of its id, so results do not depend
on batch size, ordering or device count.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from crrf_jax import metrics as M
from crrf_jax import parallel, paths
from crrf_jax import references as R
from crrf_jax import visualize as vis
from crrf_jax.data import contract, pipeline, sen12mscr

log = logging.getLogger(__name__)

EXAMPLE_ROWS = 4  # images per example grid
GROUP_SUFFIXES = ("", "_cloudy_pixels", "_clear_pixels")  # a method's groups: all, cloudy and clear pixels
# format_table's columns: (group suffix, metric).
TABLE_COLUMNS = (("", "psnr"), ("", "ssim"), ("", "sam"),
                 ("_cloudy_pixels", "psnr"), ("_cloudy_pixels", "sam"), ("_clear_pixels", "sam"))


def image_seed(image_id: str) -> int:
    """A stable 31-bit seed of an image id (its sampling noise)."""
    return zlib.crc32(image_id.encode()) & 0x7FFFFFFF


def method_groups(method: str) -> list[str]:
    """The metric groups of a method: all pixels, cloudy pixels, clear pixels."""
    return [method + suffix for suffix in GROUP_SUFFIXES]


@jax.jit
def _score(methods, target, cloud_prob, threshold):
    cloudy = M.cloudy_mask(cloud_prob[..., 0], threshold)
    scores = {"cloud_fraction": jnp.mean(cloudy, axis=(1, 2))}
    for name, pred in methods.items():
        scores[name] = M.batch_metrics(pred, target)
        scores[f"{name}_cloudy_pixels"] = M.batch_metrics(pred, target, cloudy)
        scores[f"{name}_clear_pixels"] = M.batch_metrics(pred, target, ~cloudy)
    return scores


def score_methods(
    methods: Mapping[str, np.ndarray], target: np.ndarray, cloud_prob: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Per-image metrics of each method's predictions, over all, cloudy and clear pixels.

    Args:
      methods: {method name: (B, H, W, C) predictions on [0, 1]} (clipped to [0, 1] before scoring).
      target: (B, H, W, C) cloud-free images on [0, 1].
      cloud_prob: (B, H, W, 1) on [0, 1]; pixels above `threshold` are cloudy, the others clear.
    Returns:
      host arrays: {"cloud_fraction": (B,), and for every group of `method_groups(name)`: {metric: (B,)}}.
    """
    methods = {name: jnp.asarray(pred, jnp.float32) for name, pred in methods.items()}
    return jax.device_get(_score(methods, jnp.asarray(target, jnp.float32),
                                 jnp.asarray(cloud_prob, jnp.float32), float(threshold)))


def reference_fills(
    batch: Mapping[str, Any], valid: np.ndarray, threshold: float, wall_s: dict[str, float] | None = None
) -> dict[str, np.ndarray]:
    """Every reference of `references.REFERENCES` on the valid images of a batch -> {name: (B, H, W, C)}.

    batch: "s2_cloudy" (B, H, W, C) and "cloud_prob" (B, H, W, 1) on [0, 1]; valid: bool (B,). Padding images
    (valid False) keep the cloudy input, so the batch shape (and the compiled scorer) stays the same. Each
    reference's host seconds are added to `wall_s[name]` when given.
    """
    cloudy = np.asarray(batch["s2_cloudy"], np.float32)
    cloud_prob = np.asarray(batch["cloud_prob"])
    fills = {}
    for name in R.REFERENCES:
        t0 = time.perf_counter()
        fill = cloudy.copy()
        fill[valid] = R.fill_batch(name, cloudy[valid], cloud_prob[valid], threshold)
        fills[name] = fill
        if wall_s is not None:
            wall_s[name] = wall_s.get(name, 0.0) + time.perf_counter() - t0
    return fills


def summarize(running: Mapping[str, M.RunningMean]) -> dict[str, Any]:
    """Means of every group, and `image_counts`: {group: {metric: images behind its mean}}."""
    result: dict[str, Any] = {group: acc.mean() for group, acc in running.items()}
    result["image_counts"] = {group: acc.counts for group, acc in running.items()}
    return result


def evaluate(
    remover,
    *,
    root: str,
    out: str,
    split: str = "test", protocol: str = "exact", source: str = "geotiff", data_dir: str | None = None,
    steps: int | None = None, num_samples: int = 1, guidance_scale: float | None = None, batch_size: int = 8,
    cloud_threshold: float = 0.5,
    max_images: int = 0,
    write_geotiff: bool = False,
    use_sar: bool = True,
    seed: int = 0,
    worker_count: int = 0,
    on_error: str = "raise",
    references: bool = True,
    zero_cloud_prob: bool = False,
    write_examples: bool = True,
    **predict_options: Any,
) -> dict[str, Any]:
    """Scores `remover` (an inference.CloudRemover) on a split; returns what it writes to metrics.json.

    Beyond the data and sampling settings: `references` also scores the learning-free references;
    `use_sar=False` runs the SAR-absent mode and `zero_cloud_prob` feeds the model a zero cloud map (ablations;
    the real map still decides which pixels are cloudy); `write_examples` draws the example grids (a second
    pass); `**predict_options` go to `remover.predict_tiles` (`output=`, `drop_cloudy=`, `keep_clear=`) and
    into metrics.json.
    """
    steps = int(steps or remover.config["sampling"]["steps"])
    guidance = float(remover.config["sampling"]["guidance_scale"] if guidance_scale is None else guidance_scale)
    use_sar = use_sar and remover.use_sar(True)
    def batches():
        return iter(pipeline.make_dataset(
            source=source, root=root, data_dir=data_dir, split=split, protocol=protocol,
            bands=list(remover.band_indices), batch_size=batch_size, crop_size=None, augment=False,
            shuffle=False, num_epochs=1, drop_remainder=False, worker_count=worker_count, on_error=on_error,
            process_index=0, process_count=1,  # every process reads every batch, the remover splits it
            to_float32=True,  # metrics, references and the remover's checks are on the host: floats there
        ))

    predict = functools.partial(
        _predict, remover, use_sar=use_sar, zero_cloud_prob=zero_cloud_prob, steps=steps, num_samples=num_samples,
        guidance_scale=guidance, seed=seed, pad_batch_to=batch_size, **predict_options,
    )

    methods = ["model", "cloudy_input", *(R.REFERENCES if references else ())]
    running = {group: M.RunningMean() for method in methods for group in method_groups(method)}
    wall_s = {name: 0.0 for name in methods if name != "cloudy_input"}  # host seconds (model: with compiling)
    rows: list[dict[str, Any]] = []
    data = batches()
    with tqdm(total=max_images or None, desc=f"eval {split}", unit="img", dynamic_ncols=True,
              disable=not parallel.is_writer()) as bar:
        for batch in data:
            valid = np.asarray(batch["mask"], bool)
            if not valid.any():
                continue
            mean, scores = _predict_and_score(batch, valid, predict, references, cloud_threshold, wall_s)
            keep = np.flatnonzero(valid)[: (max_images - len(rows)) if max_images else None]
            for i in keep:
                rows.append(_image_row(str(batch["id"][i]), scores, i, running))
                if write_geotiff and parallel.is_writer():
                    _write_prediction(root, out, rows[-1]["id"], mean[i], remover.band_indices, split, protocol)
            bar.update(len(keep))
            if max_images and len(rows) >= max_images:
                break
    if not rows:
        raise ValueError(f"{root}: no images in split {split!r} (protocol {protocol!r})")

    result = {
        "split": split, "protocol": protocol, "num_images": len(rows),
        "bad_samples_skipped": int(getattr(data, "bad_sample_count", 0)), "steps": steps,
        "guidance_scale": guidance, "num_samples": num_samples, "use_sar": use_sar,
        "zero_cloud_prob": zero_cloud_prob, "predict_options": dict(predict_options),
        "bands": list(remover.band_names), "clipped_to_unit_range": True, "cloud_threshold": cloud_threshold,
        "mean_cloud_fraction": float(np.mean([r["cloud_fraction"] for r in rows])), "methods": methods,
        "wall_s": wall_s, **summarize(running),
    }
    result = _write_tables(out, result, rows)
    result["examples"] = _write_examples(remover, out, rows, batches, predict) if write_examples else {}
    return result


def _write_tables(out: str, result: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json (plain floats; NaN/inf kept as JSON tokens) and per_image.csv (process 0); returns what
    was written (on every process)."""
    result = json.loads(json.dumps(result, default=float))
    if not parallel.is_writer():
        return result
    paths.as_path(out).mkdir(parents=True, exist_ok=True)  # local or a gs:// URL
    paths.write_text(paths.as_path(out) / "metrics.json", json.dumps(result, indent=2))
    _write_csv(paths.as_path(out) / "per_image.csv", rows)
    return result


def _predict(remover, batch, *, use_sar: bool, zero_cloud_prob: bool, **options):
    """The model's (mean, std) of an eval batch; each image's noise is seeded by its id (`image_seed`)."""
    ids = np.array([image_seed(str(i)) for i in batch["id"]], np.uint32)
    cloud_prob = np.asarray(batch["cloud_prob"], np.float32)
    tiles = {"s2_cloudy": batch["s2_cloudy"],
             "cloud_prob": np.zeros_like(cloud_prob) if zero_cloud_prob else cloud_prob}
    if use_sar:
        tiles["s1"] = batch["s1"]
    return remover.predict_tiles(tiles, ids, **options)


def _predict_and_score(batch, valid, predict, references: bool, threshold: float, wall_s: dict):
    """The model's prediction of a batch (host seconds into wall_s) and the per-image scores of every method."""
    t0 = time.perf_counter()
    mean, _ = predict(batch)
    wall_s["model"] += time.perf_counter() - t0
    preds = {"model": mean, "cloudy_input": batch["s2_cloudy"]}
    if references:
        preds |= reference_fills(batch, valid, threshold, wall_s)
    return mean, score_methods(preds, batch["s2"], batch["cloud_prob"], threshold)


def _image_row(image_id: str, scores: dict, i: int, running: dict[str, M.RunningMean]) -> dict[str, Any]:
    """Image i's CSV row (the model's metrics unprefixed, other groups as "<group>/<metric>"); adds its
    metrics to the running means."""
    row = {"id": image_id, "cloud_fraction": float(scores["cloud_fraction"][i])}
    for group, acc in running.items():
        one = {k: float(v[i]) for k, v in scores[group].items()}
        acc.update(one)
        prefix = "" if group == "model" else f"{group}/"
        row.update({f"{prefix}{k}": v for k, v in one.items()})
    return row


def _write_csv(path, rows: list[dict[str, Any]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths.write_text(path, text.getvalue())


def _write_examples(remover, out: str, rows, batches, predict) -> dict[str, str]:
    """Grids of the worst, median and best images by PSNR (a second pass predicts just those batches; every
    process predicts, process 0 writes)."""
    order = sorted(range(len(rows)), key=lambda i: (np.nan_to_num(rows[i]["psnr"], nan=-np.inf), rows[i]["id"]))
    k = min(EXAMPLE_ROWS, len(rows))
    mid = len(order) // 2
    picks = {"worst": order[:k], "median": order[max(0, mid - k // 2):][:k], "best": order[::-1][:k]}
    wanted = {rows[i]["id"] for idx in picks.values() for i in idx}
    panels: dict[str, list[np.ndarray]] = {}
    rgb = contract.rgb_channels(remover.band_indices)
    for batch in batches():
        hit = [i for i, image_id in enumerate(batch["id"]) if batch["mask"][i] and str(image_id) in wanted]
        if not hit:
            continue
        mean, std = predict(batch)
        for i in hit:
            panels[str(batch["id"][i])] = [
                vis.s2_rgb(batch["s2_cloudy"][i], rgb), vis.sar_rgb(batch["s1"][i]), vis.s2_rgb(mean[i], rgb),
                vis.s2_rgb(batch["s2"][i], rgb), vis.heat(std[i].mean(-1), vmax=0.05),
            ]
        if len(panels) == len(wanted):
            break
    written = {}
    for name, idx in picks.items():
        ids = [rows[i]["id"] for i in idx if rows[i]["id"] in panels]
        labels = [f"{rows[i]['psnr']:.1f} dB" for i in idx if rows[i]["id"] in panels]
        image = vis.grid([panels[i] for i in ids], row_labels=labels,
                         col_labels=["cloudy", "SAR", "prediction", "target", "uncertainty"])
        written[name] = paths.as_path(out) / f"examples_{name}.png"
        if parallel.is_writer():
            vis.save_png(image, written[name])
    return written


def _write_prediction(root, out, image_id, pred, band_indices, split, protocol) -> None:
    """The prediction as uint16 DN with the georeferencing of the image's cloud-free target file."""
    import rasterio

    if paths.is_url(out):
        raise ValueError(f"{out}: GeoTIFF predictions (write_geotiff) are written with rasterio to a local folder; "
                         "give a local output folder")
    triplet = _triplets(root, split, protocol)[image_id]
    with rasterio.open(triplet.s2) as src:
        profile = src.profile | {"count": pred.shape[-1], "dtype": "uint16", "compress": "deflate"}
    path = os.path.join(out, "predictions", f"{image_id}.tif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(contract.denormalize_s2(pred), -1, 0))
        for i, b in enumerate(band_indices):
            dst.set_band_description(i + 1, contract.S2_BANDS[b])


_TRIPLETS: dict[tuple, dict[str, sen12mscr.Triplet]] = {}


def _triplets(root, split, protocol) -> dict[str, sen12mscr.Triplet]:
    key = (root, split, protocol)
    if key not in _TRIPLETS:
        _TRIPLETS[key] = {t.id: t for t in sen12mscr.find_triplets(root, split, protocol)}
    return _TRIPLETS[key]


def method_names(result: Mapping[str, Any]) -> list[str]:
    """The methods scored in a result (groups without a pixel suffix), in the order they were added."""
    return [key for key, value in result.items()
            if isinstance(value, Mapping) and set(M.METRIC_NAMES) <= set(value)
            and not key.endswith(GROUP_SUFFIXES[1:])]


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table: one row per method (model, cloudy input, references, any other method group), columns
    PSNR / SSIM / SAM over all pixels, PSNR / SAM over cloudy pixels, SAM over clear pixels."""
    widths = (21, 9)
    spans = {"": "all pixels", "_cloudy_pixels": "cloudy pixels", "_clear_pixels": "clear"}
    top = f"{'':{widths[0]}s}"
    for suffix, label in spans.items():
        n = sum(s == suffix for s, _ in TABLE_COLUMNS)
        top += f"{label:>{n * widths[1]}s}"
    head = f"{'':{widths[0]}s}" + "".join(f"{metric:>{widths[1]}s}" for _, metric in TABLE_COLUMNS)
    lines = [_table_title(result), top, head]
    for method in method_names(result):
        cells = []
        for suffix, metric in TABLE_COLUMNS:
            value = result.get(method + suffix, {}).get(metric)
            cells.append(f"{'n/a':>{widths[1]}s}" if value is None else f"{value:{widths[1]}.4f}")
        lines.append(f"{method:{widths[0]}s}" + "".join(cells))
    return "\n".join(lines)


def _table_title(result: Mapping[str, Any]) -> str:
    title = (f"{result['split']} split ({result['protocol']} protocol), {result['num_images']} images, "
             f"{result['steps']} steps, {result['num_samples']} sample(s)")
    counts = result.get("image_counts", {})
    if "model_cloudy_pixels" in counts and "model_clear_pixels" in counts:
        title += (f"; {counts['model_cloudy_pixels'].get('psnr', 0)} with cloudy pixels, "
                  f"{counts['model_clear_pixels'].get('psnr', 0)} with clear pixels")
    notes = [f"guidance {result['guidance_scale']:g}"] if result.get("guidance_scale", 1.0) != 1.0 else []
    notes += ["no SAR"] if result.get("use_sar") is False else []
    notes += ["cloud probability zeroed"] if result.get("zero_cloud_prob") else []
    notes += [f"{k}={v}" for k, v in result.get("predict_options", {}).items()]
    return title + (f" ({', '.join(notes)})" if notes else "")
