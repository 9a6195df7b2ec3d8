"""Evaluates a trained model on a SEN12MS-CR split with the published metrics (PSNR, SSIM, SAM, MAE, RMSE).

    python eval.py --workdir=runs/demo                               # a finished training run
    python eval.py --bundle=bundles/base --data_root=/data/SEN12MSCR --split=test --steps=8 --samples=4

Writes metrics.json, per_image.csv and example grids into --out (default <workdir or bundle>/eval_<split>),
and prints the model against the cloudy input and the learning-free references (mean fill, biharmonic
inpainting; `crrf_jax.references`, filled on all the host's cores, or --reference_threads) over all, cloudy
and clear pixels. The split protocol is "exact" unless --protocol=legacy (which reproduces the published
split leak, for comparison only); metrics.json records which one was used. With --workdir, every setting a
flag leaves unset comes from the run's config (config.eval: split, batch size, samples, cloud threshold, max
images, GeoTIFFs, metric set and LPIPS weights; config.data: protocol and source; config.flow: sampling steps
and guidance).

--metric_set=rgb255 adds EMRDM's CUHK-CR metrics (crrf_jax/rgb_metrics.py: PSNR and SSIM of 8-bit images on
R, G, B and NIR, and LPIPS with --lpips_weights=lpips_alex.safetensors, made once by
`python -m crrf_jax.tools.lpips_weights`). --metric_set=sen2mtc adds EMRDM's Sen2_MTC_New metrics instead: R, G, B
rounded to DN, clipped to [0, 2000] and stretched per image to [0, 1], then PSNR / SSIM / SAM and (with
--lpips_weights) LPIPS, as "psnr_mtc", ..., "lpips_mtc".

Several processes (jax.distributed: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the
environment, as for train.py) evaluate together over all their devices; process 0 writes the files and
prints.
"""

from __future__ import annotations

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run (uses its config.json and EMA weights).")
_BUNDLE = flags.DEFINE_string("bundle", None, "An exported bundle (python -m crrf_jax.export).")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "SEN12MS-CR root (default: the run's config.data.root).")
# Unset flags take the run's config (crrf_jax.config.eval_options), or with --bundle the defaults in
# crrf_jax.config.EVAL_DEFAULTS.
_SPLIT = flags.DEFINE_enum("split", None, ["train", "val", "test", "all"], "Which split.")
_PROTOCOL = flags.DEFINE_enum("protocol", None, ["exact", "legacy"], "Split protocol (default: exact).")
_STEPS = flags.DEFINE_integer("steps", None, "Euler steps.", lower_bound=1)
_SAMPLES = flags.DEFINE_integer("samples", None, "Samples per image: their mean is scored, their std mapped.",
                                lower_bound=1)
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (1 = off).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per batch (over all devices).", lower_bound=1)
_THRESHOLD = flags.DEFINE_float("cloud_threshold", None, "Cloud probability above which a pixel is cloudy.",
                                lower_bound=0.0, upper_bound=1.0)
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Stop after this many images (0 = all).",
                                   lower_bound=0)
_GEOTIFF = flags.DEFINE_bool("geotiff", None, "Also write each prediction as a GeoTIFF.")
_NO_SAR = flags.DEFINE_bool("no_sar", False, "Evaluate the degraded SAR-absent mode.")
_NO_REFERENCES = flags.DEFINE_bool("no_references", False, "Skip the learning-free references (faster).")
_REFERENCE_THREADS = flags.DEFINE_integer(
    "reference_threads", None, "Threads filling a batch's images with the references (default: this "
    "process's cores).", lower_bound=1)
_OVERLAP = flags.DEFINE_bool(
    "overlap", None, "Compute the references while the devices sample each batch (default: unless the devices "
    "are this host's CPU, whose cores both would share).")
_METRIC_SET = flags.DEFINE_enum(
    "metric_set", None, ["sen12mscr", "rgb255", "sen2mtc"],
    "sen12mscr: the SEN12MS-CR metrics; rgb255: also EMRDM's CUHK-CR metrics (8-bit PSNR / SSIM, LPIPS); "
    "sen2mtc: also EMRDM's Sen2_MTC_New metrics (stretched RGB PSNR / SSIM / SAM, LPIPS).")
_LPIPS = flags.DEFINE_string("lpips_weights", None, "LPIPS-alex safetensors file for --metric_set=rgb255 or "
                             "sen2mtc (make it with python -m crrf_jax.tools.lpips_weights).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_DATASET = flags.DEFINE_enum("dataset", None, ["sen12mscr", "cuhk_cr1", "cuhk_cr2", "sen2_mtc_new", "sen12mscr_ts"],
                             "Benchmark of --data_root (default: what the run or bundle was trained on).")
_DATES = flags.DEFINE_integer("dates", None, "Input dates per sample (default: the run's config.data.dates; "
                              "with --bundle the model's max_dates, at most the dataset's).", lower_bound=1)
_DOWNSAMPLE = flags.DEFINE_integer("downsample", None, "Shrink images on read by this factor (default: the run's "
                                   "config.data.downsample; with --bundle 2 for CUHK-CR, as EMRDM).", lower_bound=1)

# Flag -> evaluate() keyword, for the flags that override the run's config.
_OVERRIDES = (
    (_SPLIT, "split"), (_PROTOCOL, "protocol"), (_STEPS, "steps"), (_SAMPLES, "num_samples"),
    (_GUIDANCE, "guidance_scale"), (_BATCH, "batch_size"), (_THRESHOLD, "cloud_threshold"),
    (_MAX_IMAGES, "max_images"), (_GEOTIFF, "write_geotiff"), (_METRIC_SET, "metric_set"),
    (_LPIPS, "lpips_weights"), (_REFERENCE_THREADS, "reference_threads"), (_OVERLAP, "overlap"),
)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if bool(_WORKDIR.value) == bool(_BUNDLE.value):
        raise app.UsageError("give exactly one of --workdir or --bundle")
    from absl import logging as absl_logging

    from crrf_jax import config as C
    from crrf_jax import evaluation, parallel, rundir
    from crrf_jax.data import sources
    from crrf_jax.inference import CloudRemover

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's per-array INFO lines
    parallel.initialize_distributed()

    if _WORKDIR.value:
        remover = CloudRemover.from_workdir(_WORKDIR.value)
        run_config = rundir.load_run_config(_WORKDIR.value)
        root, base = _DATA_ROOT.value or run_config.data.root, _WORKDIR.value
        options = C.eval_options(run_config) | sources.dataset_options(run_config.data)
        if _DATASET.value and _DATASET.value != options["dataset"]:
            raise app.UsageError(f"--dataset={_DATASET.value}: the run was trained on {options['dataset']}")
    else:
        remover = CloudRemover.from_bundle(_BUNDLE.value)
        root, base, options = _DATA_ROOT.value, _BUNDLE.value, dict(C.EVAL_DEFAULTS)
        dataset = _DATASET.value or remover.config.get("dataset", "sen12mscr")
        fixed = sources.dataset_info(dataset).dates  # None: SEN12MS-CR-TS, any number of dates
        options.update(dataset=dataset, dates=remover.max_dates if fixed is None else min(fixed, remover.max_dates),
                       downsample=2 if dataset.startswith("cuhk") else 1)
    options.update({k: f.value for f, k in ((_DATES, "dates"), (_DOWNSAMPLE, "downsample")) if f.value is not None})
    if not root and options["source"] == "geotiff":
        raise app.UsageError("--data_root is required with --bundle")
    options.update({key: flag.value for flag, key in _OVERRIDES if flag.value is not None})
    out = _OUT.value or rundir.eval_dir(base, options["split"])
    result = evaluation.evaluate(remover, root=root, out=out, use_sar=not _NO_SAR.value,
                                 references=not _NO_REFERENCES.value, **options)
    if not parallel.is_writer():
        return
    print(evaluation.format_table(result))
    print(f"\nwritten to {out}: metrics.json, per_image.csv, examples_*.png")


if __name__ == "__main__":
    app.run(main)
