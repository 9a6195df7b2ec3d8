"""CloudRemovalFlux: token assembly, conditioning, condition dropout, gradients and compute dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import cloud_cnn_config, flux_config
from crrf_jax.models.flux import CloudRemovalFlux, Flux, patchify, position_ids, unpatchify

B, H, W, Z = 2, 8, 8, 16  # latent batch; pixels are 8x larger


def inputs(seed: int = 0) -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.key(seed), 5)
    return dict(
        x_t=jax.random.normal(k[0], (B, H, W, Z)),
        t=jnp.array([0.2, 0.9]),
        cloudy_latent=jax.random.normal(k[1], (B, H, W, Z)),
        sar_latent=jax.random.normal(k[2], (B, H, W, Z)),
        cloud_prob=jax.random.uniform(k[3], (B, 8 * H, 8 * W, 1)),
        drop_sar=jnp.array([False, False]),
        drop_cloudy=jnp.array([False, False]),
    )


@nnx.jit
def forward(model, x):
    return model(
        x["x_t"],
        x["t"],
        x["cloudy_latent"],
        x["sar_latent"],
        x["cloud_prob"],
        drop_sar=x["drop_sar"],
        drop_cloudy=x["drop_cloudy"],
    )


def tiny(**kwargs) -> CloudRemovalFlux:
    return CloudRemovalFlux(flux_config("tiny"), cloud_cnn_config("tiny"), rngs=nnx.Rngs(0), **kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny()


def changed(a, b) -> np.ndarray:
    """Per-sample max abs difference (B,)."""
    return np.asarray(jnp.abs(a - b).max(axis=(1, 2, 3)))


def test_tokens_round_trip_and_ids():
    x = jax.random.normal(jax.random.key(0), (B, H, W, Z))
    tokens = patchify(x)
    assert tokens.shape == (B, H * W // 4, 4 * Z)
    np.testing.assert_array_equal(unpatchify(tokens, H, W), x)
    # token (row 1, col 2) holds latent pixels rows 2-3, cols 4-5, channel-major like BFL
    np.testing.assert_array_equal(tokens[0, 1 * (W // 2) + 2, :4], x[0, 2:4, 4:6, 0].reshape(-1))
    ids = position_ids(B, H, W, 1)
    assert ids.shape == (B, 16, 3)
    np.testing.assert_array_equal(ids[0, 6], [1, 1, 2])


def test_output_and_each_condition_matters(model):
    x = inputs()
    v = forward(model, x)
    assert v.shape == (B, H, W, Z) and v.dtype == jnp.float32
    assert np.isfinite(np.asarray(v)).all()

    other = inputs(seed=1)
    # cloudy tokens: change sample 0 only -> sample 0 changes, sample 1 does not (no mixing across the batch)
    cloudy = x["cloudy_latent"].at[0].set(other["cloudy_latent"][0])
    d = changed(forward(model, {**x, "cloudy_latent": cloudy}), v)
    assert d[0] > 1e-3 and d[1] == 0
    # SAR tokens
    assert changed(forward(model, {**x, "sar_latent": other["sar_latent"]}), v).min() > 1e-3
    # cloud probability through the CNN: shuffle pixels inside each 8x8 cell (the pooled map stays the same)
    cp = x["cloud_prob"].reshape(B, H, 8, W, 8, 1)[:, :, ::-1, :, ::-1].reshape(x["cloud_prob"].shape)
    assert np.allclose(patchify(_pool(cp)), patchify(_pool(x["cloud_prob"])), atol=1e-6)
    assert changed(forward(model, {**x, "cloud_prob": cp}), v).min() > 1e-4
    # ... and through the cloudy tokens' extra channels: with the CNN silenced, the map still matters
    silent = tiny()
    silent.cloud_encoder.out.kernel[...] = jnp.zeros_like(silent.cloud_encoder.out.kernel[...])
    a = forward(silent, x)
    b = forward(silent, {**x, "cloud_prob": other["cloud_prob"]})
    assert changed(a, b).min() > 1e-4


def _pool(cp):
    return cp.reshape(B, H, 8, W, 8, 1).mean(axis=(2, 4))


def test_drop_masks_and_missing_sar(model):
    x = inputs()
    v = forward(model, x)
    # drop_sar on sample 0 == SAR absent for sample 0; sample 1 untouched
    dropped = forward(model, {**x, "drop_sar": jnp.array([True, False])})
    absent = nnx.jit(lambda m, x: m(x["x_t"], x["t"], x["cloudy_latent"], None, x["cloud_prob"]))(model, x)
    np.testing.assert_allclose(dropped[0], absent[0], atol=1e-6)
    np.testing.assert_array_equal(dropped[1], v[1])
    assert changed(dropped, v)[0] > 1e-3
    # drop_cloudy on sample 0: its output no longer depends on its cloudy latent
    drop = jnp.array([True, False])
    a = forward(model, {**x, "drop_cloudy": drop})
    b = forward(model, {**x, "drop_cloudy": drop, "cloudy_latent": inputs(seed=2)["cloudy_latent"]})
    d = changed(a, b)
    assert d[0] == 0 and d[1] > 1e-3


def test_grads_are_finite_and_reach_the_null_tokens(model):
    x = {**inputs(), "drop_sar": jnp.array([True, False])}

    def loss(m):
        return jnp.mean(forward(m, x) ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert float(jnp.abs(grads.null_sar[...]).max()) > 0  # sample 0 used the null SAR token
    assert float(jnp.abs(grads.null_cloudy[...]).max()) == 0  # nobody dropped the cloudy tokens
    assert float(jnp.abs(grads.cloud_encoder.convs[0].kernel[...]).max()) > 0
    assert float(jnp.abs(grads.flux.double_blocks.img_attn.qkv.kernel[...]).max()) > 0


def test_bfloat16_compute_is_close_to_float32(model):
    x = inputs()
    v32 = forward(model, x)
    v16 = forward(tiny(dtype=jnp.bfloat16), x)  # same seed: same float32 params
    assert v16.dtype == jnp.float32
    err = float(jnp.abs(v16 - v32).max())
    assert err < 0.05 * float(jnp.abs(v32).max()), err


def random_model(variant: str, seed: int) -> CloudRemovalFlux:
    """A model with NumPy-drawn random weights (fast for the 156M-parameter base variant on CPU)."""
    abstract = nnx.eval_shape(lambda: CloudRemovalFlux(flux_config(variant), cloud_cnn_config(variant)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        value = rng.standard_normal(shape, dtype=np.float32)
        if path[-1] == "kernel":
            value *= 1 / np.sqrt(np.prod(shape[-4:-1]) if len(shape) == 4 else shape[-2])
        elif path[-1] == "scale":
            value = 1 + 0.1 * value
        elif path[-1] == "bias":
            value *= 0.02
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


def test_base_variant_grads():
    model = random_model("base", seed=1)
    x = jax.tree.map(lambda a: a[:1], inputs())  # one sample keeps the 156M-parameter backward pass quick

    def loss(m):
        return jnp.mean(forward(m, x) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value)) and float(value) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert grads.flux.single_blocks.linear1.kernel[...].shape == (8, 768, 7 * 768)
    assert float(jnp.abs(grads.flux.double_blocks.img_mod.lin.kernel[...]).max()) > 0


def test_zero_init_starts_at_zero_velocity():
    v = forward(tiny(zero_init=True), inputs())
    assert float(jnp.abs(v).max()) == 0


def test_bad_inputs_are_reported(model):
    x = inputs()
    with pytest.raises(ValueError, match="cloud_prob"):
        model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"][:, :60])
    with pytest.raises(ValueError, match="sar_latent"):
        model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"][:, :4], x["cloud_prob"])
    with pytest.raises(ValueError, match="drop mask"):
        model(
            x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"], drop_sar=jnp.ones(3, bool)
        )
    with pytest.raises(ValueError, match="in_channels"):
        CloudRemovalFlux({**flux_config("tiny").to_dict(), "in_channels": 64}, cloud_cnn_config("tiny"))
    with pytest.raises(ValueError, match="guidance"):  # the bare FLUX transformer needs its guidance input
        guided = tiny_guided()
        guided.flux(*_inner_args(guided, inputs()))


def tiny_guided(embedded_guidance: float = 1.0) -> CloudRemovalFlux:
    """FLUX.1-dev's layout (a guidance embedder) at the tiny sizes."""
    return CloudRemovalFlux({**flux_config("tiny").to_dict(), "guidance_embed": True}, cloud_cnn_config("tiny"),
                            embedded_guidance=embedded_guidance, rngs=nnx.Rngs(0))


def _inner_args(model, x):
    """The Flux arguments CloudRemovalFlux builds, recorded from one call (guidance left out)."""
    seen = {}
    original = Flux.__call__

    def record(self, *args):
        seen["args"] = args[:6]
        return original(self, *args)

    Flux.__call__ = record
    try:
        model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"])  # eager: arrays, not tracers
    finally:
        Flux.__call__ = original
    return seen["args"]


def test_guidance_embedder_gets_a_constant_in_training_and_sampling():
    x = inputs()
    model = tiny_guided(embedded_guidance=3.5)
    # What the flow loss and the sampler call: no guidance argument.
    default = model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"],
                    drop_sar=x["drop_sar"], drop_cloudy=x["drop_cloudy"])
    explicit = model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"],
                     jnp.full((B,), 3.5), drop_sar=x["drop_sar"], drop_cloudy=x["drop_cloudy"])
    np.testing.assert_array_equal(default, explicit)
    other = model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"], jnp.full((B,), 1.0),
                  drop_sar=x["drop_sar"], drop_cloudy=x["drop_cloudy"])
    assert changed(default, other).min() > 1e-4  # the embedder is used: the constant matters
    np.testing.assert_array_equal(forward(tiny(), x), forward(tiny(), x))  # no embedder: nothing to pass


def _flux_output_shifted(rows: slice, delta: float = 1.0):
    """Patches Flux.__call__ so that its output tokens in `rows` (of the image stream) move by `delta`."""
    original = Flux.__call__

    def shifted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out.at[:, rows].add(delta)

    return original, shifted


@pytest.mark.parametrize("half, moves", [("noisy", True), ("cloudy", False)])
def test_prediction_is_the_noisy_target_half_of_the_image_stream(model, half, moves):
    """Moving the transformer's outputs at the noisy-target tokens moves the prediction; moving them at the
    cloudy tokens (the last N of the image stream) must not."""
    x = inputs()
    n = (H // 2) * (W // 2)
    base = model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"])
    original, shifted = _flux_output_shifted(slice(0, n) if half == "noisy" else slice(n, 2 * n))
    Flux.__call__ = shifted
    try:
        moved = model(x["x_t"], x["t"], x["cloudy_latent"], x["sar_latent"], x["cloud_prob"])
    finally:
        Flux.__call__ = original
    if moves:
        np.testing.assert_allclose(moved - base, 1.0, atol=1e-5)
    else:
        np.testing.assert_array_equal(moved, base)


def test_the_three_streams_have_distinct_rope_ids(model):
    img, img_ids, txt, txt_ids, _, _ = _inner_args(model, inputs())
    n = (H // 2) * (W // 2)
    noisy, cloudy = np.asarray(img_ids[0, :n]), np.asarray(img_ids[0, n:])
    sar = np.asarray(txt_ids[0])
    as_set = lambda ids: {tuple(r) for r in ids.tolist()}  # noqa: E731
    assert len(as_set(noisy)) == len(as_set(cloudy)) == len(as_set(sar)) == n  # one id per token
    assert not (as_set(noisy) & as_set(cloudy)) and not (as_set(noisy) & as_set(sar))
    assert not (as_set(cloudy) & as_set(sar))
    # The same grid position in each stream: same (row, col), different stream axis.
    np.testing.assert_array_equal(noisy[:, 1:], cloudy[:, 1:])
    np.testing.assert_array_equal(noisy[:, 1:], sar[:, 1:])
    # The first n image tokens carry the noisy latent (zero cloud-probability columns), the rest the cloudy one.
    x = inputs()
    np.testing.assert_array_equal(img[:, :n, :64], patchify(x["x_t"]))
    np.testing.assert_array_equal(img[:, :n, 64:], 0.0)
    np.testing.assert_array_equal(img[:, n:, :64], patchify(x["cloudy_latent"]))
