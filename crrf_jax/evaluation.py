"""Evaluation comparable with the published SEN12MS-CR tables (UnCRtainTS, EMRDM; DESIGN section 8).

`evaluate(remover, ...)` samples every image of a split with the EMA weights (tiles batched over the local
devices), scores prediction and cloudy input against the cloud-free target, over all pixels and over cloudy
pixels only (cloud probability above a threshold), and writes into `out`:

    metrics.json     means over images, image count, split, protocol, sampling settings, the cloudy baseline
    per_image.csv    one row per image
    examples_{worst,median,best}.png   cloudy RGB | SAR | prediction | target | uncertainty, ranked by PSNR
    predictions/<id>.tif   (optional) 13-band uint16 GeoTIFFs with the target's georeferencing

Predictions are clipped to [0, 1] before scoring (the published code scores unclipped outputs; metrics.json says
`clipped_to_unit_range`). Each image's sampling noise is seeded by a hash of its id, so results do not depend
on batch size, ordering or device count.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from crrf_jax import metrics as M
from crrf_jax import visualize as vis
from crrf_jax.data import pipeline, sen12mscr

log = logging.getLogger(__name__)

EXAMPLE_ROWS = 4  # images per example grid


def image_seed(image_id: str) -> int:
    """A stable 31-bit seed of an image id (its sampling noise)."""
    return zlib.crc32(image_id.encode()) & 0x7FFFFFFF


@jax.jit
def _score(pred, cloudy, target, cloud_prob, threshold):
    mask = M.cloudy_mask(cloud_prob[..., 0], threshold)
    return {
        "model": M.batch_metrics(pred, target),
        "cloudy_input": M.batch_metrics(cloudy, target),
        "model_cloudy_pixels": M.batch_metrics(pred, target, mask),
        "cloudy_input_cloudy_pixels": M.batch_metrics(cloudy, target, mask),
        "cloud_fraction": jnp.mean(mask, axis=(1, 2)),
    }


def evaluate(
    remover,
    *,
    root: str,
    out: str,
    split: str = "test",
    protocol: str = "exact",
    source: str = "geotiff",
    data_dir: str | None = None,
    steps: int | None = None,
    num_samples: int = 1,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    cloud_threshold: float = 0.5,
    max_images: int = 0,
    write_geotiff: bool = False,
    use_sar: bool = True,
    seed: int = 0,
    worker_count: int = 0,
    on_error: str = "raise",
) -> dict[str, Any]:
    """Scores `remover` (an inference.CloudRemover) on a split; returns what it writes to metrics.json."""
    steps = int(steps or remover.config["sampling"]["steps"])
    guidance = float(remover.config["sampling"]["guidance_scale"] if guidance_scale is None else guidance_scale)
    use_sar = use_sar and remover.use_sar(True)
    os.makedirs(out, exist_ok=True)

    def batches():
        dataset = pipeline.make_dataset(
            source=source, root=root, data_dir=data_dir, split=split, protocol=protocol,
            bands=list(remover.band_indices), batch_size=batch_size, crop_size=None, augment=False,
            shuffle=False, num_epochs=1, drop_remainder=False, worker_count=worker_count, on_error=on_error,
        )
        return iter(dataset)

    def predict(batch):
        ids = np.array([image_seed(str(i)) for i in batch["id"]], np.uint32)
        tiles = {"s2_cloudy": batch["s2_cloudy"], "cloud_prob": batch["cloud_prob"]}
        if use_sar:
            tiles["s1"] = batch["s1"]
        return remover.predict_tiles(tiles, ids, steps=steps, num_samples=num_samples, guidance_scale=guidance,
                                     seed=seed, pad_batch_to=batch_size)

    rows: list[dict[str, Any]] = []
    running = {k: M.RunningMean() for k in ("model", "cloudy_input", "model_cloudy_pixels",
                                             "cloudy_input_cloudy_pixels")}
    data = batches()
    total = max_images or None
    with tqdm(total=total, desc=f"eval {split}", unit="img", dynamic_ncols=True) as bar:
        for batch in data:
            valid = np.asarray(batch["mask"], bool)
            if not valid.any():
                continue
            mean, std = predict(batch)
            scores = jax.device_get(_score(jnp.asarray(mean), jnp.asarray(batch["s2_cloudy"]),
                                           jnp.asarray(batch["s2"]), jnp.asarray(batch["cloud_prob"]),
                                           cloud_threshold))
            for i in np.flatnonzero(valid):
                row = {"id": str(batch["id"][i]), "cloud_fraction": float(scores["cloud_fraction"][i])}
                for group, acc in running.items():
                    one = {k: float(v[i]) for k, v in scores[group].items()}
                    acc.update(one)
                    prefix = "" if group == "model" else f"{group}/"
                    row.update({f"{prefix}{k}": v for k, v in one.items()})
                rows.append(row)
                if write_geotiff:
                    _write_prediction(root, out, row["id"], mean[i], remover.band_indices, split, protocol)
                bar.update(1)
                if max_images and len(rows) >= max_images:
                    break
            if max_images and len(rows) >= max_images:
                break
    if not rows:
        raise ValueError(f"{root}: no images in split {split!r} (protocol {protocol!r})")

    bad = getattr(data, "bad_sample_count", 0)
    result = {
        "split": split,
        "protocol": protocol,
        "num_images": len(rows),
        "bad_samples_skipped": int(bad),
        "steps": steps,
        "guidance_scale": guidance,
        "num_samples": num_samples,
        "use_sar": use_sar,
        "bands": list(remover.band_names),
        "clipped_to_unit_range": True,
        "cloud_threshold": cloud_threshold,
        "mean_cloud_fraction": float(np.mean([r["cloud_fraction"] for r in rows])),
        **{group: acc.mean() for group, acc in running.items()},
    }
    result = json.loads(json.dumps(result, default=float))  # plain floats (NaN/inf kept as JSON tokens)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    _write_csv(os.path.join(out, "per_image.csv"), rows)
    result["examples"] = _write_examples(remover, out, rows, batches, predict)
    return result


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_examples(remover, out: str, rows, batches, predict) -> dict[str, str]:
    """Grids of the worst, median and best images by PSNR (a second pass predicts just those batches)."""
    order = sorted(range(len(rows)), key=lambda i: (np.nan_to_num(rows[i]["psnr"], nan=-np.inf), rows[i]["id"]))
    k = min(EXAMPLE_ROWS, len(rows))
    mid = len(order) // 2
    picks = {"worst": order[:k], "median": order[max(0, mid - k // 2):][:k], "best": order[::-1][:k]}
    wanted = {rows[i]["id"] for idx in picks.values() for i in idx}
    panels: dict[str, list[np.ndarray]] = {}
    rgb = _rgb(remover.band_indices)
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
    paths = {}
    for name, idx in picks.items():
        ids = [rows[i]["id"] for i in idx if rows[i]["id"] in panels]
        labels = [f"{rows[i]['psnr']:.1f} dB" for i in idx if rows[i]["id"] in panels]
        image = vis.grid([panels[i] for i in ids], row_labels=labels,
                         col_labels=["cloudy", "SAR", "prediction", "target", "uncertainty"])
        paths[name] = vis.save_png(image, os.path.join(out, f"examples_{name}.png"))
    return paths


def _rgb(band_indices) -> tuple[int, int, int]:
    bands = list(band_indices)
    if all(b in bands for b in sen12mscr.RGB):
        return tuple(bands.index(b) for b in sen12mscr.RGB)
    return (0, 0, 0)


def _write_prediction(root, out, image_id, pred, band_indices, split, protocol) -> None:
    """The prediction as uint16 DN with the georeferencing of the image's cloud-free target file."""
    import rasterio

    triplet = _triplets(root, split, protocol)[image_id]
    with rasterio.open(triplet.s2) as src:
        profile = src.profile | {"count": pred.shape[-1], "dtype": "uint16", "compress": "deflate"}
    path = os.path.join(out, "predictions", f"{image_id}.tif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(sen12mscr.denormalize_s2(pred), -1, 0))
        for i, b in enumerate(band_indices):
            dst.set_band_description(i + 1, sen12mscr.S2_BANDS[b])


_TRIPLETS: dict[tuple, dict[str, sen12mscr.Triplet]] = {}


def _triplets(root, split, protocol) -> dict[str, sen12mscr.Triplet]:
    key = (root, split, protocol)
    if key not in _TRIPLETS:
        _TRIPLETS[key] = {t.id: t for t in sen12mscr.find_triplets(root, split, protocol)}
    return _TRIPLETS[key]


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of model vs cloudy input (all pixels and cloudy pixels)."""
    head = f"{'':28s}" + "".join(f"{m:>9s}" for m in M.METRIC_NAMES)
    lines = [f"{result['split']} split ({result['protocol']} protocol), {result['num_images']} images, "
             f"{result['steps']} steps, {result['num_samples']} sample(s)", head]
    for group in ("model", "cloudy_input", "model_cloudy_pixels", "cloudy_input_cloudy_pixels"):
        vals = result[group]
        lines.append(f"{group:28s}" + "".join(f"{vals[m]:9.4f}" for m in M.METRIC_NAMES))
    return "\n".join(lines)
