"""The train step itself: gradient accumulation, the learning-rate clock, and the non-finite guard.

The model is the tiny CloudRemovalFlux and the loss its rectified-flow MSE at fixed times and fixed noise taken
from the batch, so the loss is a mean over rows with no randomness: splitting the batch into micro-batches must
then give the same update as the whole batch, up to float32 summation order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from crrf_jax import train_lib
from crrf_jax.models import build

B, HW = 8, 4  # rows; latent grid 4x4 (a 32x32 image)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = lambda: rng.normal(size=(B, HW, HW, 16)).astype(np.float32)  # noqa: E731
    return {"x0": lat(), "cloudy": lat(), "sar": lat(), "eps": lat(),
            "t": rng.uniform(0.05, 0.95, B).astype(np.float32),
            "cloud_prob": rng.uniform(0, 1, (B, 8 * HW, 8 * HW, 1)).astype(np.float32)}


def _loss(model, batch, rng, frozen):
    del rng, frozen
    t = batch["t"]
    x_t = (1 - t[:, None, None, None]) * batch["x0"] + t[:, None, None, None] * batch["eps"]
    v = model(x_t, t, batch["cloudy"], batch["sar"], batch["cloud_prob"])
    mse = jnp.mean((v - (batch["eps"] - batch["x0"])) ** 2)
    return mse, {"mse": mse}


def _optim(**overrides):
    # One schedule and guard for every test: equal settings compile to the same program, which the
    # persistent compilation cache then shares between the tests.
    cfg = common.optim_config(steps=8, lr=1e-3, batch_size=B, warmup_steps=4)
    cfg.max_bad_steps = 2
    cfg.eps = 1e-6  # see tests/helpers/sharded_step.py: bounds Adam's amplification of summation-order noise
    cfg.update(overrides)
    return cfg


def _run(cfg, batches, loss=_loss):
    tx = train_lib.make_optimizer(cfg)
    model = build.cloud_removal_flux(common.model_config("tiny"))
    state = train_lib.create_train_state(model, tx)
    step = jax.jit(functools.partial(train_lib.train_step, loss_fn=loss, tx=tx,
                                     cfg=train_lib.StepConfig.from_config(cfg)))
    trace = []
    for batch in batches:
        state, metrics = step(state, batch, jax.random.key(0), None)
        trace.append(jax.device_get(metrics))
    return state, trace


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_four_micro_batches_equal_one_step_of_the_whole_batch():
    batches = [_batch(0), _batch(1)]
    whole, whole_trace = _run(_optim(grad_accum=1), batches)
    accum, accum_trace = _run(_optim(grad_accum=4), batches)
    for w, a in zip(whole_trace, accum_trace):
        np.testing.assert_allclose(a["loss"], w["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], w["grad_norm"], rtol=1e-4)
        assert a["lr"] == w["lr"]
    # Two Adam updates of lr <= 5e-4 each: float32 summation order leaves differences of ~1e-7.
    for w, a in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=2e-6)
    assert int(whole.updates) == int(accum.updates) == 2
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(accum.params), jax.tree.leaves(_run(_optim(), [])[0].params)))
    assert moved > 1e-4  # the steps did change the weights, so the comparison means something


def test_a_micro_batch_split_that_does_not_divide_is_an_error():
    with pytest.raises(ValueError, match="grad_accum=3"):
        _run(_optim(grad_accum=3), [_batch()])


def test_logged_lr_is_the_applied_rate_and_the_schedule_counts_updates():
    cfg = _optim(grad_accum=4)
    _, trace = _run(cfg, [_batch(i) for i in range(8)])
    schedule = train_lib.lr_schedule(cfg)
    np.testing.assert_allclose([m["lr"] for m in trace], [schedule(i) for i in range(8)], rtol=1e-6)
    assert trace[4]["lr"] == pytest.approx(cfg.lr)  # warmup lasts 4 steps, whatever grad_accum is
    assert trace[-1]["lr"] < 0.3 * cfg.lr  # and the cosine is near its end (0.1 lr) at the last step


def _poisoned(batch):
    bad = dict(batch)
    bad["x0"] = np.full_like(batch["x0"], np.nan)
    return bad


def test_a_non_finite_step_changes_nothing_but_the_guard():
    good = _batch(0)
    state, trace = _run(_optim(), [good, _poisoned(good)])
    ref, _ = _run(_optim(), [good])
    for a, b in zip(jax.tree.leaves((state.params, state.ema, state.opt_state)),
                    jax.tree.leaves((ref.params, ref.ema, ref.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert trace[1]["skipped"] == 1.0 and trace[0]["skipped"] == 0.0
    assert (int(state.guard.consecutive), int(state.guard.total), int(state.guard.halted_at)) == (1, 1, 0)
    assert int(state.updates) == 1 and int(state.step) == 2
    train_lib.check_finite(state, 2)  # not halted: no error


def test_consecutive_non_finite_steps_halt_on_device_and_never_apply():
    good = _batch(0)
    batches = [good, _poisoned(good), _poisoned(good), good, good]  # halts at step 3: later steps are no-ops
    state, trace = _run(_optim(), batches)
    ref, _ = _run(_optim(), [good])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.guard.halted_at) == 3 and [m["skipped"] for m in trace] == [0, 1, 1, 1, 1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    with pytest.raises(train_lib.NonFiniteError, match="at step 3"):
        train_lib.check_finite(state, 2)


def test_a_compact_batch_is_normalised_first_inside_the_step():
    """The pipelines' uint8 cloud probability (and uint16 DN) become float32 inside the jitted step: one step
    on the compact batch is the step on its host float32 form."""
    from crrf_jax.data import contract

    stored = np.random.default_rng(5).integers(0, 256, (B, 8 * HW, 8 * HW, 1), dtype=np.uint8)
    compact = {**_batch(0), "cloud_prob": stored}
    floats = {**_batch(0), "cloud_prob": contract.cloud_prob_from_uint8(stored)}
    (a, trace_a), (b, trace_b) = _run(_optim(), [compact]), _run(_optim(), [floats])
    assert trace_a[0]["loss"] == trace_b[0]["loss"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))


def test_the_donated_step_applies_optax_and_the_ema_and_a_skipped_one_keeps_the_state():
    """train.py's compiled step (explicit shardings, state donated: XLA updates it in place): a finite step is
    optax's update of the loss's gradients with the EMA of the new weights, computed here independently; a
    non-finite step after it leaves weights, moments and EMA bit for bit as they were."""
    from flax import nnx

    from crrf_jax import parallel

    cfg = _optim()
    tx = train_lib.make_optimizer(cfg)
    step_cfg = train_lib.StepConfig.from_config(cfg)
    mesh = parallel.make_mesh({"data": -1})
    state = train_lib.init_train_state(lambda: build.cloud_removal_flux(common.model_config("tiny")), tx, mesh)
    good = _batch(0)
    batch_shardings = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in good.items()}
    step = train_lib.compile_step(functools.partial(train_lib.train_step, loss_fn=_loss, tx=tx, cfg=step_cfg),
                                  train_lib.train_state_shardings(state, tx, mesh), batch_shardings, None, mesh)

    objective = lambda p: _loss(nnx.merge(state.graphdef, p, state.rest), good, None, None)[0]  # noqa: E731
    grads = jax.grad(objective)(state.params)
    updates, want_opt = tx.update(grads, state.opt_state, state.params)
    want_params = jax.device_get(optax.apply_updates(state.params, updates))
    want_ema = jax.tree.map(lambda e, p: step_cfg.ema_decay * e + (1 - step_cfg.ema_decay) * p,
                            jax.device_get(state.ema), want_params)
    want_opt = jax.device_get(want_opt)

    state, metrics = step(state, good, jax.random.key(0), None)
    assert metrics["skipped"] == 0.0
    got = jax.device_get((state.params, state.opt_state, state.ema))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves((want_params, want_opt, want_ema))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    state, metrics = step(state, _poisoned(good), jax.random.key(0), None)
    assert metrics["skipped"] == 1.0
    for a, b in zip(jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.ema))),
                    jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.updates) == 1 and int(state.guard.consecutive) == 1
