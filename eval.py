"""Evaluates a trained model on a SEN12MS-CR split with the published metrics (PSNR, SSIM, SAM, MAE, RMSE).

    python eval.py --workdir=runs/demo                               # a finished training run
    python eval.py --bundle=bundles/base --data_root=/data/SEN12MSCR --split=test --steps=8 --samples=4

Writes metrics.json, per_image.csv and example grids into --out (default <workdir or bundle>/eval_<split>),
and prints the model against the cloudy input and the learning-free references (mean fill, biharmonic
inpainting; `crrf_jax.references`) over all, cloudy and clear pixels. The split protocol is "exact" unless
--protocol=legacy (which reproduces the published split leak, for comparison only); metrics.json records which
one was used.

Several processes (jax.distributed: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the
environment, as for train.py) evaluate together over all their devices; process 0 writes the files and prints.
"""

from __future__ import annotations

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run (uses its config.json and EMA weights).")
_BUNDLE = flags.DEFINE_string("bundle", None, "An exported bundle (python -m crrf_jax.export).")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "SEN12MS-CR root; default: the run's config.data.root.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test", "all"], "Which split.")
_PROTOCOL = flags.DEFINE_enum("protocol", "exact", ["exact", "legacy"], "Split protocol.")
_STEPS = flags.DEFINE_integer("steps", None, "Euler steps (default: the model's sampling default).")
_SAMPLES = flags.DEFINE_integer("samples", 1, "Samples per image: their mean is scored, their std mapped.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (1 = off).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch (over all devices).")
_THRESHOLD = flags.DEFINE_float("cloud_threshold", 0.5, "Cloud probability above which a pixel is cloudy.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Stop after this many images (0 = all).")
_GEOTIFF = flags.DEFINE_bool("geotiff", False, "Also write each prediction as a GeoTIFF.")
_NO_SAR = flags.DEFINE_bool("no_sar", False, "Evaluate the degraded SAR-absent mode.")
_NO_REFERENCES = flags.DEFINE_bool("no_references", False, "Skip the learning-free references (faster).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if bool(_WORKDIR.value) == bool(_BUNDLE.value):
        raise app.UsageError("give exactly one of --workdir or --bundle")
    from absl import logging as absl_logging

    from crrf_jax import evaluation, parallel, rundir
    from crrf_jax.inference import CloudRemover

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's per-array INFO lines
    parallel.initialize_distributed()

    if _WORKDIR.value:
        remover = CloudRemover.from_workdir(_WORKDIR.value)
        run_config = rundir.load_run_config(_WORKDIR.value)
        root = _DATA_ROOT.value or run_config.data.root
        base = _WORKDIR.value
    else:
        remover = CloudRemover.from_bundle(_BUNDLE.value)
        root, base = _DATA_ROOT.value, _BUNDLE.value
    if not root:
        raise app.UsageError("--data_root is required with --bundle")
    out = _OUT.value or rundir.eval_dir(base, _SPLIT.value)
    result = evaluation.evaluate(
        remover, root=root, out=out, split=_SPLIT.value, protocol=_PROTOCOL.value, steps=_STEPS.value,
        num_samples=_SAMPLES.value, guidance_scale=_GUIDANCE.value, batch_size=_BATCH.value,
        cloud_threshold=_THRESHOLD.value, max_images=_MAX_IMAGES.value, write_geotiff=_GEOTIFF.value,
        use_sar=not _NO_SAR.value, references=not _NO_REFERENCES.value,
    )
    if not parallel.is_writer():
        return
    print(evaluation.format_table(result))
    print(f"\nwritten to {out}: metrics.json, per_image.csv, examples_*.png")


if __name__ == "__main__":
    app.run(main)
