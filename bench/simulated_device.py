"""A device of a given speed, simulated on the host: what the host's pipeline would see beside a fast GPU.

`install(rate)` replaces the sampler by an identity whose results arrive as from a device sampling `rate`
tiles/s, one batch after another: a batch is ready (its padded size) / rate seconds after the later of its submission
and the previous batch's readiness, and waiting for its mean (`parallel.to_host`) sleeps until then, leaving
the CPU to the host's threads as a GPU would. It shows how far the host's own work hides behind the device's.
`device_at(rate)` is the same as a context manager. Used by bench/predict_scene.py (in its child process) and
bench/evaluation.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import jax.numpy as jnp

from crrf_jax import parallel, sampling


def install(rate: float) -> Callable[[], None]:
    """Puts the simulated device in place of `sampling.sample_patches_jit` (and `parallel.to_host`); returns
    the call that undoes it."""
    ready: dict[int, float] = {}
    free = [0.0]
    inner_sampler, inner_to_host = sampling.sample_patches_jit, parallel.to_host

    def sampler(nets, cloudy, *args, **kwargs):
        free[0] = max(time.perf_counter(), free[0]) + cloudy.shape[0] / rate
        ready[id(cloudy)] = free[0]
        return cloudy, jnp.zeros_like(cloudy)

    def to_host(x):
        due = ready.pop(id(x), None)
        if due is not None:
            time.sleep(max(0.0, due - time.perf_counter()))
        return inner_to_host(x)

    def restore() -> None:
        sampling.sample_patches_jit, parallel.to_host = inner_sampler, inner_to_host

    sampling.sample_patches_jit, parallel.to_host = sampler, to_host
    return restore


@contextlib.contextmanager
def device_at(rate: float) -> Iterator[None]:
    restore = install(rate)
    try:
        yield
    finally:
        restore()
