"""Config validation: combinations that would fail deep inside a run are refused up front, naming the key."""

from __future__ import annotations

import pytest

from configs import demo, sen12mscr
from crrf_jax import config as C


def _demo(**updates):
    c = demo.get_config()
    for key, value in updates.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def test_the_shipped_configs_validate():
    C.validate(demo.get_config())
    c = sen12mscr.get_config()
    c.data.root = "/data/SEN12MSCR"
    C.validate(c)


@pytest.mark.parametrize(
    "updates, message",
    [
        ({"flow.grad_accum": 3}, r"config.flow.grad_accum=3 must be >= 1 and divide config.flow.batch_size=8"),
        ({"vae_s2.grad_accum": 0}, r"config.vae_s2.grad_accum=0"),
        ({"refiner.max_bad_steps": 0}, r"config.refiner.max_bad_steps=0 must be >= 1"),
        ({"flow.cache_latents": True, "flow.pixel_loss_weight": 0.1},
         r"cache_latents=True with config.flow.pixel_loss_weight > 0: cached batches hold latents"),
        ({"data.crop_size": 40}, r"config.data.crop_size=40 must be a multiple of 16"),
    ],
)
def test_bad_combinations_are_refused_naming_the_key(updates, message):
    with pytest.raises(ValueError, match=message):
        C.validate(_demo(**updates))


def test_cached_latents_alone_and_the_pixel_loss_alone_are_fine():
    C.validate(_demo(**{"flow.cache_latents": True}))
    C.validate(_demo(**{"flow.cache_latents": False, "flow.pixel_loss_weight": 0.1}))


BENCHMARK_CONFIGS = ("cuhk_cr1", "cuhk_cr2", "sen2_mtc_new", "sen12mscr_ts", "demo_mt")


@pytest.mark.parametrize("name", BENCHMARK_CONFIGS)
def test_benchmark_configs_load_and_validate(name):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    if not c.get("demo"):
        with pytest.raises(ValueError, match="no data: set --config.data.root"):
            C.validate(c)
        c.data.root = "/data/x"
    C.validate(c)
    dataset = "sen2_mtc_new" if name == "demo_mt" else name
    assert c.data.dataset == dataset
    rgbn = dataset != "sen12mscr_ts"
    assert c.model.vae_s2.in_channels == c.model.refiner.bands == (4 if rgbn else 13)
    assert c.data.has_sar == (not rgbn) and c.data.dates == (1 if dataset.startswith("cuhk") else 3)
    assert c.data.downsample == (2 if dataset.startswith("cuhk") else 1)


def test_config_strings_of_the_benchmarks():
    from configs import cuhk_cr2, sen12mscr_ts

    c = cuhk_cr2.get_config("variant=tiny,stage=flow,bands=rgb")
    assert (c.model.variant, c.stage, c.data.bands, c.model.vae_s2.in_channels) == ("tiny", "flow", "rgb", 3)
    assert sen12mscr_ts.get_config("dates=5").data.dates == 5
    with pytest.raises(ValueError, match=r"unknown config-string keys \['dates'\]"):
        cuhk_cr2.get_config("dates=2")


def test_the_configs_dataset_table_agrees_with_the_readers():
    from configs import common
    from crrf_jax.data import contract, sources

    assert tuple(common.DATASETS) == sources.DATASETS
    for name, entry in common.DATASETS.items():
        info = sources.dataset_info(name)
        assert [contract.S2_BANDS[i] for i in contract.resolve_bands(entry["bands"] or None)] == list(info.bands)
        assert entry["has_sar"] == info.has_sar
        assert info.dates is None or entry["dates"] == info.dates
