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

Other benchmarks (`dataset`, `crrf_jax.data.sources.DATASETS`): the split comes through
`pipeline.eval_dataset` of that dataset, and the remover gets each batch as it comes (s2_cloudy and
cloud_prob with their date axis T for the multi-temporal ones, s1 only where the dataset has SAR).
Multi-temporal data is scored against its per-image least cloudy date (the date of lowest mean cloud
probability): `cloudy_input` is that date, the single-image references fill it from its own clear pixels,
and its cloud map decides which pixels count as cloudy; the temporal reference `least_cloudy_composite`
(every pixel from the date where it is least cloudy) is scored beside them. GeoTIFF predictions need
georeferenced files (SEN12MS-CR, Sen2_MTC_New, SEN12MS-CR-TS: the target's profile); CUHK-CR's PNGs have
none, and its predictions are not written (one log line says so).

Metric sets (`metric_set`): "sen12mscr" (the default) scores every group with `metrics.batch_metrics`;
"rgb255" adds EMRDM's CUHK-CR metrics to each method's all-pixel group (`rgb_metrics.RGB255Scorer`: PSNR and
SSIM of 8-bit images as "psnr_255" / "ssim_255", on R, G, B and NIR when the model has B08, and "lpips" when
`lpips_weights` names an LPIPS-alex safetensors file); "sen2mtc" adds EMRDM's Sen2_MTC_New metrics
(`rgb_metrics.Sen2MTCScorer`: R, G, B rounded to DN, clipped to [0, 2000] and min-max stretched per image, then
PSNR / SSIM / SAM / MAE / RMSE as "<metric>_mtc" and, with `lpips_weights`, "lpips_mtc"); metrics.json records
the set, bands and weights file.

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
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from crrf_jax import metrics as M
from crrf_jax import parallel, paths, rgb_metrics
from crrf_jax import references as R
from crrf_jax import visualize as vis
from crrf_jax.data import contract, pipeline, sen12mscr, sources

log = logging.getLogger(__name__)

EXAMPLE_ROWS = 4  # images per example grid
GROUP_SUFFIXES = ("", "_cloudy_pixels", "_clear_pixels")  # a method's groups: all, cloudy and clear pixels
# format_table's columns: (group suffix, metric).
TABLE_COLUMNS = (("", "psnr"), ("", "ssim"), ("", "sam"),
                 ("_cloudy_pixels", "psnr"), ("_cloudy_pixels", "sam"), ("_clear_pixels", "sam"))
# format_table's columns of the "rgb255" and "sen2mtc" metric sets, shown when the model's group has them.
RGB255_COLUMNS = (("", "psnr_255"), ("", "ssim_255"), ("", "lpips"))
SEN2MTC_COLUMNS = (("", "psnr_mtc"), ("", "ssim_mtc"), ("", "sam_mtc"), ("", "lpips_mtc"))
METRIC_SETS = ("sen12mscr", "rgb255", "sen2mtc")
_SCORERS = {"rgb255": rgb_metrics.RGB255Scorer, "sen2mtc": rgb_metrics.Sen2MTCScorer}


def metric_scorer(metric_set: str, band_names, lpips_weights: str | None = None):
    """The extra scorer of a metric set for `score_methods`: None for "sen12mscr", an
    `rgb_metrics.RGB255Scorer` for "rgb255", a `rgb_metrics.Sen2MTCScorer` for "sen2mtc" (LPIPS with
    `lpips_weights`, a safetensors file)."""
    if metric_set not in METRIC_SETS:
        raise ValueError(f"metric_set={metric_set!r}: must be one of {', '.join(METRIC_SETS)}")
    if metric_set == "sen12mscr":
        if lpips_weights:
            raise ValueError(f"lpips_weights={lpips_weights!r} is used only with metric_set='rgb255' or "
                             f"'sen2mtc'")
        return None
    return _SCORERS[metric_set](band_names, lpips_weights)


def metric_set_info(extra) -> dict[str, Any]:
    """What metrics.json records of `metric_scorer`'s scorer: {<set>: {"bands", "lpips_weights"}} or {}."""
    return {} if extra is None else {extra.metric_set: {"bands": extra.bands, "lpips_weights": extra.lpips_weights}}


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
    methods: Mapping[str, np.ndarray], target: np.ndarray, cloud_prob: np.ndarray, threshold: float = 0.5,
    extra=None,
) -> dict[str, Any]:
    """Per-image metrics of each method's predictions, over all, cloudy and clear pixels.

    Args:
      methods: {method name: (B, H, W, C) predictions on [0, 1]} (clipped to [0, 1] before scoring).
      target: (B, H, W, C) cloud-free images on [0, 1].
      cloud_prob: (B, H, W, 1) on [0, 1]; pixels above `threshold` are cloudy, the others clear.
      extra: `metric_scorer`'s scorer or None; its metrics join each method's all-pixel group.
    Returns:
      host arrays: {"cloud_fraction": (B,), and for every group of `method_groups(name)`: {metric: (B,)}}.
    """
    methods = {name: jnp.asarray(pred, jnp.float32) for name, pred in methods.items()}
    scores = jax.device_get(_score(methods, jnp.asarray(target, jnp.float32),
                                   jnp.asarray(cloud_prob, jnp.float32), float(threshold)))
    if extra is not None:
        for name, values in extra(methods, target).items():
            scores[name] = {**scores[name], **values}
    return scores


def reference_fills(
    batch: Mapping[str, Any], valid: np.ndarray, threshold: float, wall_s: dict[str, float] | None = None,
    pool: Executor | None = None,
) -> dict[str, np.ndarray]:
    """Every reference of `references.REFERENCES` on the valid images of a batch -> {name: (B, H, W, C)}.

    batch: "s2_cloudy" (B, H, W, C) and "cloud_prob" (B, H, W, 1) on [0, 1]; valid: bool (B,). Padding images
    (valid False) keep the cloudy input, so the batch shape (and the compiled scorer) stays the same. Each
    reference's host seconds are added to `wall_s[name]` when given; `pool` fills the images side by side
    (`references.fill_batch`).
    """
    cloudy = np.asarray(batch["s2_cloudy"], np.float32)
    cloud_prob = np.asarray(batch["cloud_prob"])
    fills = {}
    for name in R.REFERENCES:
        t0 = time.perf_counter()
        fill = cloudy.copy()
        fill[valid] = R.fill_batch(name, cloudy[valid], cloud_prob[valid], threshold, pool=pool)
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
    cloud_threshold: float = 0.5, max_images: int = 0, write_geotiff: bool = False, use_sar: bool = True,
    seed: int = 0, worker_count: int = 0, on_error: str = "raise", references: bool = True,
    zero_cloud_prob: bool = False, write_examples: bool = True,
    dataset: str = "sen12mscr", dates: int = 1, downsample: int = 1,
    metric_set: str = "sen12mscr", lpips_weights: str | None = None,
    reference_threads: int | None = None, overlap: bool | None = None,
    **predict_options: Any,
) -> dict[str, Any]:
    """Scores `remover` (an inference.CloudRemover) on a split; returns what it writes to metrics.json.

    Beyond the data and sampling settings: `references` also scores the learning-free references;
    `use_sar=False` runs the SAR-absent mode and `zero_cloud_prob` feeds the model a zero cloud map (ablations;
    the real map still decides which pixels are cloudy); `write_examples` draws the example grids (a second
    pass); `dataset`, `dates`, `downsample` pick the benchmark (`sources.dataset_options(config.data)`);
    `metric_set`, `lpips_weights`: `metric_scorer`; `**predict_options` go to `remover.submit_tiles`
    (`output=`, `drop_cloudy=`, `keep_clear=`) and into metrics.json. Host work: `reference_threads` fill a
    batch's images side by side (default: this process's cores); `overlap` computes the references while the
    devices sample the batch (default: unless the devices are this host's CPU, whose cores both would share).
    Neither changes a figure, only `wall_s`: the model's seconds run from submitting each batch to its
    prediction on the host (with compiling), each reference's are its own wall seconds.
    """
    steps = int(steps or remover.config["sampling"]["steps"])
    guidance = float(remover.config["sampling"]["guidance_scale"] if guidance_scale is None else guidance_scale)
    info = sources.dataset_info(dataset)
    use_sar = use_sar and info.has_sar and remover.use_sar(True)
    temporal = dataset in TEMPORAL_DATASETS and dates > 1
    data_options = {"dataset": dataset, "dates": dates, "downsample": downsample}
    extra = metric_scorer(metric_set, remover.band_names, lpips_weights)

    def batches():
        return iter(pipeline.make_dataset(
            source=source, root=root, data_dir=data_dir, split=split, protocol=protocol,
            bands=list(remover.band_indices), batch_size=batch_size, crop_size=None, augment=False,
            shuffle=False, num_epochs=1, drop_remainder=False, worker_count=worker_count, on_error=on_error,
            process_index=0, process_count=1,  # every process reads every batch, the remover splits it
            to_float32=True, **data_options,  # metrics, references and the remover's checks: floats, on the host
        ))

    submit = functools.partial(
        _submit, remover, use_sar=use_sar, zero_cloud_prob=zero_cloud_prob, steps=steps,
        num_samples=num_samples, guidance_scale=guidance, seed=seed, pad_batch_to=batch_size,
        **predict_options,
    )

    methods = ["model", "cloudy_input", *(R.REFERENCES if references else ()),
               *(("least_cloudy_composite",) if references and temporal else ())]
    geotiff = write_geotiff and _GeoTiffWriter(root, out, remover.band_indices, split, protocol, data_options)
    running = {group: M.RunningMean() for method in methods for group in method_groups(method)}
    wall_s = {name: 0.0 for name in methods if name != "cloudy_input"}
    data = batches()
    with ExitStack() as stack:
        threads = _HostThreads(stack, remover, references, reference_threads, overlap)
        score = functools.partial(_predict_and_score, submit=submit, references=references,
                                  threshold=cloud_threshold, wall_s=wall_s, extra=extra, threads=threads)
        rows = _score_batches(data, score, running, geotiff, max_images, f"eval {split}")
    if not rows:
        raise ValueError(f"{root}: no images in split {split!r} (protocol {protocol!r})")

    result = {
        "split": split, "protocol": protocol, "num_images": len(rows),
        "bad_samples_skipped": int(getattr(data, "bad_sample_count", 0)), "steps": steps,
        "guidance_scale": guidance, "num_samples": num_samples, "use_sar": use_sar,
        "zero_cloud_prob": zero_cloud_prob, "predict_options": dict(predict_options),
        "bands": list(remover.band_names), "clipped_to_unit_range": True, "cloud_threshold": cloud_threshold,
        "dataset": dataset, "dates": dates if temporal else 1,
        **({"scored_against": "least cloudy date"} if temporal else {}),
        "mean_cloud_fraction": float(np.mean([r["cloud_fraction"] for r in rows])), "methods": methods,
        "wall_s": wall_s, **threads.info(), "metric_set": metric_set, **metric_set_info(extra),
        **summarize(running),
    }
    result = _write_tables(out, result, rows)
    result["examples"] = _write_examples(remover, out, rows, batches, submit) if write_examples else {}
    return result


def _score_batches(data, score, running, geotiff, max_images: int, desc: str) -> list[dict[str, Any]]:
    """Scores the valid images of every batch of `data` (at most `max_images`, 0 = all) into `running` and the
    per-image rows; GeoTIFF predictions through `geotiff` (process 0)."""
    rows: list[dict[str, Any]] = []
    with tqdm(total=max_images or None, desc=desc, unit="img", dynamic_ncols=True,
              disable=not parallel.is_writer()) as bar:
        for batch in data:
            valid = np.asarray(batch["mask"], bool)
            if not valid.any():
                continue
            mean, scores = score(batch, valid)
            keep = np.flatnonzero(valid)[: (max_images - len(rows)) if max_images else None]
            for i in keep:
                rows.append(_image_row(str(batch["id"][i]), scores, i, running))
                if geotiff and parallel.is_writer():
                    geotiff.write(rows[-1]["id"], mean[i])
            bar.update(len(keep))
            if max_images and len(rows) >= max_images:
                break
    return rows


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


def _submit(remover, batch, *, use_sar: bool, zero_cloud_prob: bool, **options):
    """Submits an eval batch to the model; the call it returns waits for its (mean, std). Each image's noise
    is seeded by its id (`image_seed`)."""
    ids = np.array([image_seed(str(i)) for i in batch["id"]], np.uint32)
    cloud_prob = np.asarray(batch["cloud_prob"], np.float32)
    tiles = {"s2_cloudy": batch["s2_cloudy"],
             "cloud_prob": np.zeros_like(cloud_prob) if zero_cloud_prob else cloud_prob}
    if use_sar and "s1" in batch:
        tiles["s1"] = batch["s1"]
    return remover.submit_tiles(tiles, ids, **options)


class _HostThreads:
    """The evaluation's host threads, ended with `stack`: `fill`, a pool that fills a batch's images side by
    side (None with one thread or no references), and `waiter`, one thread that waits for the model's batch
    while the caller computes the references (None without overlap)."""

    def __init__(self, stack: ExitStack, remover, references: bool, threads: int | None,
                 overlap: bool | None):
        self.threads = max(1, int(threads or pipeline.host_cores())) if references else 0
        if overlap is None:
            overlap = references and remover.platform != "cpu"
        self.fill = (stack.enter_context(ThreadPoolExecutor(self.threads, thread_name_prefix="reference"))
                     if self.threads > 1 else None)
        self.waiter = (stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="model_wait"))
                       if overlap else None)

    def info(self) -> dict[str, Any]:
        """What metrics.json records of them."""
        return {"reference_threads": self.threads, "model_overlapped": self.waiter is not None}

    def wait(self, pending) -> Future:
        """A future of (pending's (mean, std), the time it came): waited for in `waiter`, or here and now."""
        if self.waiter is not None:
            return self.waiter.submit(_timed, pending)
        done: Future = Future()
        done.set_result(_timed(pending))
        return done


def _timed(pending) -> tuple[Any, float]:
    return pending(), time.perf_counter()


def _predict_and_score(batch, valid, submit, references: bool, threshold: float, wall_s: dict,
                       threads: _HostThreads, extra=None):
    """The model's prediction of a batch and the per-image scores of every method; each method's seconds
    into wall_s. The references are computed while the model's batch runs when `threads` overlap them."""
    t0 = time.perf_counter()
    ready = threads.wait(submit(batch))  # the whole batch, dates included
    single = least_cloudy_date(batch)
    preds = {"cloudy_input": single["s2_cloudy"]}
    if references:
        preds |= reference_fills(single, valid, threshold, wall_s, pool=threads.fill)
        if single is not batch:
            t1 = time.perf_counter()
            preds["least_cloudy_composite"] = np.stack([
                R.least_cloudy_composite(x, p) for x, p in zip(batch["s2_cloudy"], batch["cloud_prob"])])
            wall_s["least_cloudy_composite"] += time.perf_counter() - t1
    (mean, _), came = ready.result()
    wall_s["model"] += came - t0
    return mean, score_methods({"model": mean, **preds}, batch["s2"], single["cloud_prob"], threshold, extra)


TEMPORAL_DATASETS = ("sen2_mtc_new", "sen12mscr_ts")  # batches with a date axis: (B, T, H, W, C)


def least_cloudy_date(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """A multi-temporal batch's per-image least cloudy date (lowest mean cloud probability; ties: the earliest)
    as a single-date view: "s2_cloudy" (B, H, W, C), "cloud_prob" (B, H, W, 1), "date" (B,). What the cloudy
    input and the single-image references are scored on. A single-date batch comes back as it is."""
    cloudy = np.asarray(batch["s2_cloudy"])
    if cloudy.ndim != 5:
        return batch
    prob = np.asarray(batch["cloud_prob"])
    date = contract.least_cloudy_dates(prob, 1)[:, 0]
    rows = np.arange(len(date))
    return {**batch, "s2_cloudy": cloudy[rows, date], "cloud_prob": prob[rows, date], "date": date}


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


def _write_examples(remover, out: str, rows, batches, submit) -> dict[str, str]:
    """Grids of the worst, median and best images by PSNR (a second pass predicts just those batches; every
    process predicts, process 0 writes)."""
    order = sorted(range(len(rows)), key=lambda i: (np.nan_to_num(rows[i]["psnr"], nan=-np.inf), rows[i]["id"]))
    k = min(EXAMPLE_ROWS, len(rows))
    mid = len(order) // 2
    picks = {"worst": order[:k], "median": order[max(0, mid - k // 2):][:k], "best": order[::-1][:k]}
    wanted = {rows[i]["id"] for idx in picks.values() for i in idx}
    panels: dict[str, list[np.ndarray]] = {}
    rgb = contract.rgb_channels(remover.band_indices)
    middle_label = "SAR"
    for batch in batches():
        hit = [i for i, image_id in enumerate(batch["id"]) if batch["mask"][i] and str(image_id) in wanted]
        if not hit:
            continue
        mean, std = submit(batch)()
        single = least_cloudy_date(batch)
        for i in hit:
            # SAR where the dataset has it, else the (least cloudy date's) cloud probability
            middle = (vis.sar_rgb(batch["s1"][i].reshape(-1, *batch["s1"].shape[-3:])[-1]) if "s1" in batch
                      else vis.heat(single["cloud_prob"][i][..., 0], vmax=1.0))
            panels[str(batch["id"][i])] = [
                vis.s2_rgb(single["s2_cloudy"][i], rgb), middle, vis.s2_rgb(mean[i], rgb),
                vis.s2_rgb(batch["s2"][i], rgb), vis.heat(std[i].mean(-1), vmax=0.05),
            ]
        middle_label = "SAR" if "s1" in batch else "cloud prob."
        if len(panels) == len(wanted):
            break
    written = {}
    for name, idx in picks.items():
        ids = [rows[i]["id"] for i in idx if rows[i]["id"] in panels]
        labels = [f"{rows[i]['psnr']:.1f} dB" for i in idx if rows[i]["id"] in panels]
        image = vis.grid([panels[i] for i in ids], row_labels=labels,
                         col_labels=["cloudy", middle_label, "prediction", "target", "uncertainty"])
        written[name] = paths.as_path(out) / f"examples_{name}.png"
        if parallel.is_writer():
            vis.save_png(image, written[name])
    return written


def _write_prediction(root, out, image_id, pred, band_indices, split, protocol) -> None:
    """The prediction as uint16 DN with the georeferencing of the image's cloud-free target file."""
    _write_geotiff(out, image_id, pred, band_indices, _triplets(root, split, protocol)[image_id].s2)


def _write_geotiff(out, image_id, pred, band_indices, reference) -> None:
    """`pred` as uint16 DN in <out>/predictions/<id>.tif with the profile (grid, CRS) of the file `reference`."""
    import rasterio

    if paths.is_url(out):
        raise ValueError(f"{out}: GeoTIFF predictions (write_geotiff) are written with rasterio to a local folder; "
                         "give a local output folder")
    with rasterio.open(reference) as src:
        profile = src.profile | {"count": pred.shape[-1], "dtype": "uint16", "compress": "deflate"}
    path = os.path.join(out, "predictions", f"{image_id}.tif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(contract.denormalize_s2(pred), -1, 0))
        for i, b in enumerate(band_indices):
            dst.set_band_description(i + 1, contract.S2_BANDS[b])


class _GeoTiffWriter:
    """Writes predictions as GeoTIFFs with the georeferencing of each image's target file: SEN12MS-CR's
    triplets, or the `reference_file` of the other datasets' sources; datasets without georeferenced files
    (CUHK-CR) are skipped with one log line."""

    def __init__(self, root, out, band_indices, split, protocol, data_options):
        self.root, self.out, self.band_indices = root, out, band_indices
        self.split, self.protocol, self.options = split, protocol, data_options
        self.files: dict[str, Any] | None = None
        if not sources.dataset_info(data_options["dataset"]).georeferenced:
            log.info("dataset %s has no georeferenced files: predictions are not written as GeoTIFFs",
                     data_options["dataset"])
            self.files = {}

    def write(self, image_id: str, pred: np.ndarray) -> None:
        if self.options["dataset"] == "sen12mscr":
            _write_prediction(self.root, self.out, image_id, pred, self.band_indices, self.split, self.protocol)
            return
        if self.files is None:
            src = sources.open_source("geotiff", root=self.root, split=self.split, **self.options)
            self.files = {item.id: src.reference_file(i) for i, item in enumerate(src.items)}
        if self.files.get(image_id) is not None:
            _write_geotiff(self.out, image_id, pred, self.band_indices, self.files[image_id])


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
    PSNR / SSIM / SAM over all pixels, PSNR / SAM over cloudy pixels, SAM over clear pixels, and the "rgb255"
    set's 8-bit PSNR / SSIM and LPIPS or the "sen2mtc" set's PSNR / SSIM / SAM / LPIPS where the model's group
    has them."""
    widths = (21, 9)
    spans = [("all pixels", TABLE_COLUMNS[:3]), ("cloudy pixels", TABLE_COLUMNS[3:5]), ("clear", TABLE_COLUMNS[5:])]
    for label, columns in (("8-bit (EMRDM)", RGB255_COLUMNS), ("Sen2_MTC (EMRDM)", SEN2MTC_COLUMNS)):
        extra = tuple(c for c in columns if c[1] in result.get("model", {}))
        if extra:
            spans.append((label, extra))
    columns = [column for _, span in spans for column in span]
    top = f"{'':{widths[0]}s}" + "".join(f"{label:>{len(span) * widths[1]}s}" for label, span in spans)
    head = f"{'':{widths[0]}s}" + "".join(f"{metric:>{widths[1]}s}" for _, metric in columns)
    lines = [_table_title(result), top, head]
    for method in method_names(result):
        cells = []
        for suffix, metric in columns:
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
