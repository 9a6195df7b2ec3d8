"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.

Trains one VAE step, one flow step (cloudy source) and one refiner step of the tiny variant on a 1-device mesh and on a (data=2, fsdp=2, tensor=2)
mesh from the same initial state and batch, and prints a JSON report: losses, the largest parameter difference,
and, per stage, how many parameters are split across devices.
"""

import functools
import json
import sys

import jax
import numpy as np

from configs import common
from crrf_jax import flow as rf
from crrf_jax import parallel, sampling, train_lib
from crrf_jax.models import build


def batch(rng, b=8, size=32, bands=13):
    r = np.random.default_rng(rng)
    return {
        "s2": r.uniform(0, 1, (b, size, size, bands)).astype(np.float32),
        "s2_cloudy": r.uniform(0, 1, (b, size, size, bands)).astype(np.float32),
        "s1": r.uniform(0, 1, (b, size, size, 2)).astype(np.float32),
        "cloud_prob": r.uniform(0, 1, (b, size, size, 1)).astype(np.float32),
    }


def optimizer():
    cfg = common.optim_config(steps=10, lr=1e-3, batch_size=8, warmup_steps=0)
    # Adam's first update is lr * g / (|g| + eps): for gradient elements near 0 it turns float32 reduction-order
    # noise (which differs between 1 and 8 devices) into O(lr) changes. eps = 1e-6 bounds that amplification so
    # the comparison measures the sharding, not the noise; gradients are also compared through grad_norm.
    cfg.eps = 1e-6
    return train_lib.make_optimizer(cfg)


def run_step(mesh, initial, loss_fn, frozen, data):
    """One step from `initial` (a host copy of the initial train state) placed in `mesh`'s shardings."""
    tx = optimizer()
    shardings = train_lib.train_state_shardings(initial, tx, mesh)
    state = jax.device_put(initial, shardings)
    bsh = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in data.items()}
    if frozen is not None:
        frozen = jax.device_put(frozen, parallel.replicated(mesh))
    fsh = jax.tree.map(lambda x: x.sharding, frozen) if frozen is not None else None
    step = functools.partial(train_lib.train_step, loss_fn=loss_fn, tx=tx, cfg=train_lib.StepConfig(ema_decay=0.9))
    f = train_lib.compile_step(step, shardings, bsh, fsh, mesh)
    gb = {k: jax.device_put(v, bsh[k]) for k, v in data.items()}
    state, metrics = f(state, gb, jax.random.key(1), frozen)
    split = 0
    for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
        if hasattr(leaf, "addressable_shards") and leaf.ndim:
            if leaf.addressable_shards[0].data.shape != leaf.shape:
                split += 1
    return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params), split


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    model = common.model_config("tiny")
    one = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    data = batch(0)
    report = {}
    vae_fn = functools.partial(build.autoencoder, model, "vae_s2")
    vae_loss = functools.partial(train_lib.vae_loss, cfg=train_lib.VaeLossConfig("s2", 1e-6, 0.1))
    flow_fn = functools.partial(build.cloud_removal_flux, model)
    spec = rf.FlowSpec("cloudy", 0.2)
    flow_loss = functools.partial(train_lib.flow_loss, cfg=train_lib.FlowLossConfig(joint_dropout=0.1, spec=spec))
    vaes = build.autoencoder(model, "vae_s2"), build.autoencoder(model, "vae_s1")
    frozen = sampling.Networks.of_vaes(*vaes)
    refiner_fn = functools.partial(build.refiner, model)
    refiner_loss = functools.partial(
        train_lib.refiner_loss, cfg=train_lib.RefinerLossConfig(sam_weight=0.2, flow_steps=1, spec=spec)
    )
    nets = sampling.Networks.of(build.cloud_removal_flux(model), *vaes)
    stages = (("vae", vae_fn, vae_loss, None), ("flow", flow_fn, flow_loss, frozen),
              ("refiner", refiner_fn, refiner_loss, nets))
    for name, model_fn, loss_fn, fr in stages:
        # One initialisation (compiled once), placed on either mesh: both steps start from the same state.
        initial = jax.device_get(train_lib.init_train_state(model_fn, optimizer(), one))
        l1, g1, p1, _ = run_step(one, initial, loss_fn, fr, data)
        l8, g8, p8, split = run_step(eight, initial, loss_fn, fr, data)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        report[name] = {"loss_1": l1, "loss_8": l8, "grad_norm_1": g1, "grad_norm_8": g8, "max_param_diff": diff, "split_leaves": split,
                        "leaves": len(jax.tree.leaves(p8))}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
