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
    C.validate(_demo(**{"flow.pixel_loss_weight": 0.1}))
