"""FLUX building blocks: timestep embedding, RoPE, attention, norms, and logical axis names on every param."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import cloud_cnn_config, flux_config
from crrf_jax.models.flux import CloudRemovalFlux, Flux, FluxConfig
from crrf_jax.models.layers import (
    DoubleStreamBlock,
    RMSNorm,
    SingleStreamBlock,
    apply_rope,
    attention,
    embed_nd,
    rope,
    timestep_embedding,
)
from crrf_jax.parallel import LOGICAL_AXIS_RULES


def test_timestep_embedding_matches_formula():
    t = np.array([0.0, 0.25, 1.0], np.float32)
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10_000) * np.arange(4) / 4)
    args = 1000 * t[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), rtol=1e-5, atol=1e-4)
    assert emb.dtype == np.float32
    odd = np.asarray(timestep_embedding(t, 7, time_factor=1.0))
    assert odd.shape == (3, 7) and np.all(odd[:, -1] == 0)
    np.testing.assert_allclose(odd[0], [1, 1, 1, 0, 0, 0, 0])  # t = 0: cos 1, sin 0


def test_rope_rotations():
    pos = jnp.array([[0.0, 1.0, 7.0]])
    r = np.asarray(rope(pos, 6, 10_000))
    assert r.shape == (1, 3, 3, 2, 2)
    np.testing.assert_allclose(r[0, 0], np.broadcast_to(np.eye(2), (3, 2, 2)), atol=1e-7)  # position 0
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(2), r.shape), atol=1e-6)
    # the first channel pair turns by exactly `pos` radians
    np.testing.assert_allclose(r[0, 2, 0], [[np.cos(7), -np.sin(7)], [np.sin(7), np.cos(7)]], atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        rope(pos, 5, 10_000)


def test_rope_attention_scores_depend_on_relative_position():
    key = jax.random.key(0)
    q, k = jax.random.normal(key, (2, 1, 1, 1, 12))
    axes = (4, 4, 4)

    def score(pq, pk):
        ids = jnp.array([[pq, pk]], jnp.float32)  # (1, 2 tokens, 3 axes)
        pe = embed_nd(ids, axes, 10_000)
        assert pe.shape == (1, 1, 2, 6, 2, 2)
        rq, _ = apply_rope(q, q, pe[:, :, :1])
        rk, _ = apply_rope(k, k, pe[:, :, 1:])
        return float(jnp.sum(rq * rk))

    a = score([0, 2, 3], [1, 5, 1])
    b = score([4, 12, 10], [5, 15, 8])  # both shifted by (4, 10, 7)
    c = score([0, 2, 3], [1, 6, 1])
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert abs(a - c) > 1e-3
    rq, _ = apply_rope(q, q, embed_nd(jnp.array([[[3.0, 1.0, 2.0]]]), axes, 10_000))
    assert float(jnp.linalg.norm(rq)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)  # rotations
    with pytest.raises(ValueError, match="axes"):
        embed_nd(jnp.zeros((1, 2, 2)), axes, 10_000)


def test_attention_matches_naive_softmax():
    b, h, n, d = 2, 3, 5, 8
    q, k, v = jax.random.normal(jax.random.key(1), (3, b, h, n, d))
    pe = embed_nd(jnp.zeros((b, n, 3)), (2, 2, 4), 10_000)  # all positions 0: identity rotations
    out = np.asarray(jax.jit(attention)(q, k, v, pe))
    assert out.shape == (b, n, h * d)
    logits = np.einsum("bhld,bhmd->bhlm", q, k) / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bhlm,bhmd->blhd", w, v).reshape(b, n, h * d)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    out_bf16 = jax.jit(attention)(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), pe)
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), ref, atol=5e-2)


def test_rms_norm_and_dtypes():
    norm = RMSNorm(8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (4, 8)) * 5
    y = np.asarray(norm(x))
    np.testing.assert_allclose(np.sqrt(np.mean(y**2, -1)), 1.0, rtol=1e-4)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocks_shapes_and_compute_dtype(dtype):
    rngs = nnx.Rngs(0)
    double = DoubleStreamBlock(32, 2, 4.0, qkv_bias=True, dtype=dtype, rngs=rngs)
    single = SingleStreamBlock(32, 2, 4.0, dtype=dtype, rngs=rngs)
    img = jnp.ones((2, 6, 32), dtype)
    txt = jnp.ones((2, 3, 32), dtype)
    vec = jnp.ones((2, 32))
    pe = embed_nd(jnp.zeros((2, 9, 3)), (4, 6, 6), 10_000)
    img2, txt2 = nnx.jit(lambda block, *a: block(*a))(double, img, txt, vec, pe)
    assert img2.shape == img.shape and txt2.shape == txt.shape and img2.dtype == dtype
    x = nnx.jit(lambda block, *a: block(*a))(single, jnp.concatenate([txt2, img2], 1), vec, pe)
    assert x.shape == (2, 9, 32) and x.dtype == dtype
    assert double.img_mod.lin.kernel.get_value().dtype == jnp.float32  # params stay float32


def _check_axis_names(model: nnx.Module, stacked_prefixes: tuple[str, ...]) -> int:
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    n = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        where = "/".join(map(str, path))
        assert names is not None, f"{where} has no logical axis names"
        assert len(names) == var.get_value().ndim, f"{where}: names {names} for shape {var.get_value().shape}"
        assert set(names) <= known, f"{where}: unknown logical names {set(names) - known}"
        stacked = any(p in stacked_prefixes for p in map(str, path))
        assert (names[0] == "layers") == stacked, f"{where}: {names}"
        n += 1
    return n


def test_every_param_has_logical_axis_names():
    model = nnx.eval_shape(lambda: CloudRemovalFlux(flux_config("base"), cloud_cnn_config("base")))
    assert _check_axis_names(model, ("double_blocks", "single_blocks")) > 50
    flux = nnx.eval_shape(lambda: Flux(FluxConfig.flux1_dev()))
    _check_axis_names(flux, ("double_blocks", "single_blocks"))
    assert flux.double_blocks.img_attn.qkv.kernel.get_value().shape == (19, 3072, 9216)
    assert flux.single_blocks.linear1.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


def test_remat_policies_give_the_same_gradients():
    cfg = FluxConfig.from_dict(flux_config("tiny"))
    img = jax.random.normal(jax.random.key(3), (1, 4, cfg.in_channels))
    txt = jax.random.normal(jax.random.key(4), (1, 3, cfg.context_in_dim))
    ids = jnp.arange(12.0).reshape(1, 4, 3)
    y = jnp.ones((1, cfg.vec_in_dim))

    def grads(policy):
        model = Flux(cfg, remat_policy=policy, rngs=nnx.Rngs(5))
        loss = lambda m: jnp.sum(m(img, ids, txt, ids[:, :3], jnp.array([0.3]), y) ** 2)  # noqa: E731
        return nnx.jit(nnx.grad(loss))(model)

    ref = grads("none")
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(grads("dots_saveable")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        Flux(cfg, remat_policy="sometimes")
