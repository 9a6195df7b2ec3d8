"""What a training config may say: the stages, and the checks train.py, eval and export share.

Configs (configs/*.py) are data: ml_collections ConfigDicts built by `configs.common`. This module holds the
code that reads them, so every entry point validates the same way.
"""

from __future__ import annotations

from crrf_jax.data.contract import resolve_bands  # (configs size the S2 networks with it)

# The stages of a run, in order; `config.stage` picks one ("" runs them all).
STAGES = ("vae_s2", "vae_s1", "latent_stats", "flow", "refiner")
AUTOENCODER_STAGES = ("vae_s2", "vae_s1")
TRAINED_STAGES = ("vae_s2", "vae_s1", "flow", "refiner")  # the stages with an optimizer section


def has_refiner(model_cfg) -> bool:
    """Whether a model config (a run's `config.model` or a bundle's "model") includes the refiner."""
    refiner = model_cfg.get("refiner")
    return bool(refiner and refiner.get("enabled", True))


def has_sar(model_cfg) -> bool:
    """Whether a model config has a Sentinel-1 input (and its autoencoder): `model.sar`, default True. Models
    of datasets without SAR (CUHK-CR, Sen2_MTC_New) have none and always run the SAR-absent mode."""
    return bool(model_cfg.get("sar", True))


def autoencoders(model_cfg) -> tuple[str, ...]:
    """The autoencoder stages of a model: vae_s2, and vae_s1 when it has SAR."""
    return tuple(s for s in AUTOENCODER_STAGES if s != "vae_s1" or has_sar(model_cfg))


def stages_to_run(config) -> list[str]:
    """The configured stage, or every stage in order; the refiner only when the model has one, vae_s1 only
    when it has SAR."""
    stages = [config.stage] if config.stage else list(STAGES)
    return [s for s in stages if (s != "refiner" or has_refiner(config.model))
            and (s != "vae_s1" or has_sar(config.model))]


def stage_crop(config, stage: str) -> int:
    """A stage's training crop: `config.<stage>.crop_size` where set (the autoencoders, which are fully
    convolutional, may learn on smaller crops), else `config.data.crop_size`."""
    section = config.get(stage)
    crop = section.get("crop_size", 0) if section is not None else 0
    return int(crop or config.data.crop_size)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"config.{name}={value!r}: choose one of {tuple(choices)}")


def validate(config) -> None:
    """Clear errors (naming the key) for config values that would otherwise fail deep inside."""
    from crrf_jax import flow as rf
    from crrf_jax.models import build

    if config.stage:
        _choice("stage", config.stage, STAGES)
    _choice("data.source", config.data.source, ("geotiff", "tfds"))
    _choice("data.protocol", config.data.protocol, ("exact", "legacy"))
    _choice("refiner.input", config.refiner.input, ("flow", "roundtrip"))
    if config.data.crop_size % 16:
        raise ValueError(f"config.data.crop_size={config.data.crop_size} must be a multiple of 16")
    for stage in AUTOENCODER_STAGES:
        crop = stage_crop(config, stage)
        if crop % 16 or crop > config.data.crop_size:
            raise ValueError(f"config.{stage}.crop_size={crop} must be a multiple of 16 and at most "
                             f"config.data.crop_size={config.data.crop_size}")
    for stage in TRAINED_STAGES:
        section = config[stage]
        accum = int(section.get("grad_accum", 1))
        if accum < 1 or section.batch_size % accum:
            raise ValueError(f"config.{stage}.grad_accum={accum} must be >= 1 and divide "
                             f"config.{stage}.batch_size={section.batch_size}")
        if int(section.max_bad_steps) < 1:
            raise ValueError(f"config.{stage}.max_bad_steps={section.max_bad_steps} must be >= 1")
    if config.flow.cache_latents and config.flow.pixel_loss_weight:
        raise ValueError(
            "config.flow.cache_latents=True with config.flow.pixel_loss_weight > 0: cached batches hold "
            "latents, not the pixels the pixel loss compares against; turn one of them off"
        )
    if config.stage == "refiner" and not has_refiner(config.model):
        raise ValueError("config.stage='refiner' but config.model.refiner.enabled is False")
    if config.stage == "vae_s1" and not has_sar(config.model):
        raise ValueError("config.stage='vae_s1' but config.model.sar is False (a model without SAR)")
    max_dates = int(config.model.get("max_dates", 1))
    if not 1 <= int(config.data.get("dates", 1)) <= max_dates:
        raise ValueError(f"config.data.dates={config.data.get('dates', 1)} must be in [1, config.model.max_dates="
                         f"{max_dates}] (the model's cloudy-date groups)")
    if has_sar(config.model) and not config.data.get("has_sar", True):
        raise ValueError(f"config.model.sar=True but config.data.dataset={config.data.dataset!r} has no SAR: "
                         "set --config.model.sar=False")
    if config.flow.cache_latents and (int(config.model.get("max_dates", 1)) > 1 or not has_sar(config.model)):
        raise ValueError("config.flow.cache_latents=True needs a single-date model with SAR (the cache holds "
                         "one cloudy and one SAR latent per sample); turn it off")
    if not 0.0 <= float(config.flow.get("date_dropout", 0.0)) < 1.0:
        raise ValueError(f"config.flow.date_dropout={config.flow.date_dropout} must be in [0, 1)")
    _validate_init(config)
    rf.FlowSpec.from_config(config.flow)  # a bad flow.source / source_sigma
    build.compute_dtype(config.dtype)
    if not config.get("demo") and not config.data.root and not config.data.tfds_data_dir:
        raise ValueError("no data: set --config.data.root=/path/to/SEN12MSCR (the official layout)")


def eval_options(config) -> dict:
    """What a run's config says about evaluating it: the `evaluation.evaluate` keywords that eval.py and the
    demo take from `config.eval`, `config.data` and `config.flow` (eval.py's flags override each)."""
    e, d = config.eval, config.data
    return dict(
        split=e.split, protocol=d.protocol, source=d.source, data_dir=d.get("tfds_data_dir") or None,
        steps=int(config.flow.sample_steps), num_samples=int(e.num_samples), batch_size=int(e.batch_size),
        guidance_scale=float(config.flow.guidance_scale), cloud_threshold=float(e.cloud_threshold),
        max_images=int(e.max_images), write_geotiff=bool(e.write_geotiff),
        metric_set=str(e.get("metric_set", "sen12mscr")), lpips_weights=e.get("lpips_weights") or None,
    )


# Evaluation settings without a run config (an exported bundle): the published test split, exact protocol.
EVAL_DEFAULTS = dict(split="test", protocol="exact", source="geotiff", data_dir=None, steps=None,
                     num_samples=1, batch_size=8, guidance_scale=None, cloud_threshold=0.5, max_images=0,
                     write_geotiff=False, metric_set="sen12mscr", lpips_weights=None)


def _validate_init(config) -> None:
    """config.init: paths that exist, and band sets a FLUX VAE can seed (crrf_jax/models/pretrained.py)."""
    import os

    from crrf_jax.models import pretrained

    init = config.get("init")
    if init is None:  # a config written before config.init existed
        return
    for key in ("flux", *AUTOENCODER_STAGES):
        path = init[key]
        if not isinstance(path, str):
            raise TypeError(f"config.init.{key}={path!r} must be a path (a string; '' for none)")
        if path and not os.path.exists(path):
            raise ValueError(f"config.init.{key}={path!r}: no such checkpoint file or folder")
    if init.vae_s1:
        pretrained.rgb_positions(None, f"config.init.vae_s1={init.vae_s1!r}")  # raises: S1 has no RGB
    if init.vae_s2:
        pretrained.rgb_positions(resolve_bands(config.data.bands),
                                 f"config.init.vae_s2 with config.data.bands={config.data.bands!r}")
