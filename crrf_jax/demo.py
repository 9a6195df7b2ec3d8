"""The end of the demo job (configs/demo.py): evaluate, export, predict a scene, and say where everything is."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("crrf_jax.demo")

SCENE_SIZE = (300, 400)  # a scene larger than a tile and not a multiple of it


def finish(config, workdir: str | os.PathLike) -> dict:
    """Runs after training: test-split metrics (model vs cloudy input), a bundle, a tiled scene prediction.

    With several processes all of them evaluate and predict together (over every device); process 0 writes the
    bundle, the demo scene and the files, and prints the summary.
    """
    from crrf_jax import bundle as bundle_lib
    from crrf_jax import config as C
    from crrf_jax import evaluation, parallel, rundir
    from crrf_jax.data import sources, synthetic
    from crrf_jax.inference import CloudRemover
    from crrf_jax.predict import predict_scene

    parts = rundir.read_workdir(workdir)  # every process alike: Orbax calls are made by all processes
    bundle = rundir.bundle_dir(workdir)
    if parallel.is_writer():
        bundle_lib.write_bundle(parts, bundle, overwrite=True)
    rundir.sync("demo-bundle")
    remover = CloudRemover.from_bundle(bundle)
    options = C.eval_options(config) | sources.dataset_options(config.data)  # the test split by default
    eval_dir = rundir.eval_dir(workdir, options["split"])
    result = evaluation.evaluate(remover, root=config.data.root, out=eval_dir, **options)
    if options["dataset"] != "sen12mscr":  # the demo scene is a 13-band single-date SEN12MS-CR scene
        log.info("demo on %s: no scene prediction (the demo scene is SEN12MS-CR's)", options["dataset"])
        if parallel.is_writer():
            print("\n" + evaluation.format_table(result) + f"\n\nbundle:        {bundle}\n"
                  f"metrics:       {eval_dir}/metrics.json, per_image.csv\n"
                  f"training logs: tensorboard --logdir {workdir}")
        return result
    scene_dir = rundir.scene_dir(workdir)  # GeoTIFFs (rasterio): a local workdir (trainer.prepare_data checks)
    scene = synthetic.synthetic_scene_paths(scene_dir)
    if parallel.is_writer():
        scene = synthetic.write_synthetic_scene(scene_dir, *SCENE_SIZE, seed=123)
    rundir.sync("demo-scene")
    prediction, uncertainty = scene_dir / "prediction.tif", scene_dir / "uncertainty.tif"
    predict_scene(remover, scene["s2_cloudy"], s1_path=scene["s1"], out_path=prediction,
                  uncertainty_path=uncertainty, steps=config.flow.sample_steps, num_samples=2)
    if not parallel.is_writer():
        return result
    preview = _scene_preview(scene, prediction, remover.band_indices, scene_dir / "scene.png")
    print("\n" + evaluation.format_table(result))
    print(
        f"\nbundle:        {bundle}\n"
        f"metrics:       {eval_dir}/metrics.json, per_image.csv\n"
        f"pictures:      {eval_dir}/examples_{{best,median,worst}}.png, {preview}\n"
        f"scene:         {prediction} (uncertainty: {uncertainty})\n"
        f"training logs: tensorboard --logdir {workdir}"
    )
    return result


def _scene_preview(scene, prediction_path, band_indices, out) -> str:
    """cloudy | prediction | cloud-free truth of the demo scene, true colour."""
    import numpy as np
    import rasterio

    from crrf_jax import visualize as vis
    from crrf_jax.data import contract

    def read(path):
        with rasterio.open(path) as src:
            return contract.normalize_s2(np.moveaxis(src.read(), 0, -1))

    cloudy, clear = read(scene["s2_cloudy"]), read(scene["s2"])
    pred = read(prediction_path)  # the model's bands: a subset shows its own RGB
    rgb, rgb_pred = contract.RGB, contract.rgb_channels(band_indices)
    image = vis.grid([[vis.s2_rgb(cloudy, rgb), vis.s2_rgb(pred, rgb_pred), vis.s2_rgb(clear, rgb)]],
                     col_labels=["cloudy", "prediction", "cloud-free"])
    return vis.save_png(image, out)
