"""Flux vs diffusers' FluxTransformer2DModel (PyTorch CPU, float32, random weights); the weight importers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from flax import nnx  # noqa: E402

from crrf_jax.models.flux import Flux, FluxConfig  # noqa: E402
from crrf_jax.models.port import (  # noqa: E402
    flux_bfl_shapes,
    flux_diffusers_to_bfl,
    flux_from_bfl,
    flux_from_diffusers,
)

# Small configs: (heads, head_dim, axes_dim, depth, single depth, in, out, context, vec, guidance)
CONFIGS = {
    "no_guidance": (2, 16, (4, 6, 6), 1, 2, 68, 64, 64, 48, False),
    "guidance": (3, 8, (2, 2, 4), 2, 1, 16, 16, 24, 20, True),
    "deeper": (2, 12, (4, 4, 4), 3, 3, 8, 12, 10, 6, True),
}


def flux_config(name: str) -> FluxConfig:
    heads, head_dim, axes, depth, single, c_in, c_out, ctx, vec, guidance = CONFIGS[name]
    return FluxConfig(
        in_channels=c_in,
        out_channels=c_out,
        vec_in_dim=vec,
        context_in_dim=ctx,
        hidden_size=heads * head_dim,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=axes,
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance,
    )


def diffusers_model(cfg: FluxConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    ).eval()


def random_inputs(
    cfg: FluxConfig, seed: int, batch: int = 2, n: int = 12, m: int = 5
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        img=rng.normal(size=(batch, n, cfg.in_channels)).astype(np.float32),
        img_ids=np.concatenate([np.zeros((n, 1)), rng.integers(0, 16, size=(n, 2))], axis=1).astype(
            np.float32
        ),
        txt=rng.normal(size=(batch, m, cfg.context_in_dim)).astype(np.float32),
        txt_ids=rng.integers(0, 8, size=(m, 3)).astype(np.float32),
        timesteps=rng.uniform(size=batch).astype(np.float32),
        y=rng.normal(size=(batch, cfg.vec_in_dim)).astype(np.float32),
        guidance=rng.uniform(1, 5, size=batch).astype(np.float32),
    )


def run_diffusers(model: FluxTransformer2DModel, cfg: FluxConfig, x: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        out = model(
            hidden_states=t["img"],
            encoder_hidden_states=t["txt"],
            pooled_projections=t["y"],
            timestep=t["timesteps"],
            img_ids=t["img_ids"],  # diffusers takes unbatched ids (N, 3)
            txt_ids=t["txt_ids"],
            guidance=t["guidance"] if cfg.guidance_embed else None,
            return_dict=False,
        )[0]
    return out.numpy()


_forward = nnx.jit(lambda model, *args: model(*args))  # one compile per config, shared by the tests


def run_ours(model: Flux, cfg: FluxConfig, x: dict[str, np.ndarray]) -> np.ndarray:
    b = x["img"].shape[0]
    batched = lambda ids: jnp.broadcast_to(ids, (b, *ids.shape))  # noqa: E731
    out = _forward(
        model,
        x["img"],
        batched(x["img_ids"]),
        x["txt"],
        batched(x["txt_ids"]),
        x["timesteps"],
        x["y"],
        x["guidance"] if cfg.guidance_embed else None,
    )
    return np.asarray(out)


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err < 1e-4 * scale, f"max abs error {err:.3e} at output scale {scale:.3f}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    cfg = flux_config(name)
    torch.manual_seed(0)
    ref_model = diffusers_model(cfg)
    with torch.no_grad():  # the RMSNorm weights start at 1; make them random so the mapping is tested
        for pname, p in ref_model.named_parameters():
            if "norm_q" in pname or "norm_k" in pname or "norm_added" in pname:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    ours = flux_from_diffusers(state, cfg)
    x = random_inputs(cfg, seed=1)
    ref = run_diffusers(ref_model, cfg, x)
    assert np.abs(ref).max() > 0.1  # a non-trivial output
    assert_close(run_ours(ours, cfg, x), ref)


def random_bfl_state(cfg: FluxConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in flux_bfl_shapes(cfg).items():
        if key.endswith(".scale"):
            value = 1 + 0.3 * rng.normal(size=shape)
        elif key.endswith(".weight"):
            value = rng.normal(size=shape) / np.sqrt(shape[1])
        else:
            value = 0.1 * rng.normal(size=shape)
        state[key] = value.astype(np.float32)
    return state


def diffusers_from_bfl_via_converter(state: dict[str, np.ndarray], cfg: FluxConfig, monkeypatch):
    """Loads a BFL state dict into diffusers with diffusers' own single-file converter.

    The converter hard-codes FLUX.1's width when it splits single-block linear1 into q, k, v and mlp
    (sizes (3072, 3072, 3072, 12288)); for our small widths those sizes are rescaled to (h, h, h, 4h).
    """
    real_split = torch.split

    def split(tensor, sizes, dim=0):
        if (
            isinstance(sizes, tuple)
            and sizes == (3072, 3072, 3072, 12288)
            and tensor.shape[dim] != sum(sizes)
        ):
            h = tensor.shape[dim] // 7
            sizes = (h, h, h, 4 * h)
        return real_split(tensor, sizes, dim)

    monkeypatch.setattr(torch, "split", split)
    converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(
        {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    )
    monkeypatch.setattr(torch, "split", real_split)
    model = diffusers_model(cfg)
    model.load_state_dict(converted, strict=True)
    return model


@pytest.mark.parametrize("name", ["no_guidance", "guidance"])
def test_bfl_format_matches_diffusers_converter(name, monkeypatch):
    cfg = flux_config(name)
    state = random_bfl_state(cfg, seed=2)
    ref_model = diffusers_from_bfl_via_converter(state, cfg, monkeypatch)
    ours = flux_from_bfl(state, cfg)
    x = random_inputs(cfg, seed=3)
    ref = run_diffusers(ref_model, cfg, x)
    assert np.abs(ref).max() > 0.1
    assert_close(run_ours(ours, cfg, x), ref)
    # Our own diffusers -> BFL conversion inverts diffusers' converter exactly.
    back = flux_diffusers_to_bfl({k: v.numpy() for k, v in ref_model.state_dict().items()}, cfg)
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_bfl_prefixed_keys_and_scanned_layout():
    cfg = flux_config("deeper")
    state = random_bfl_state(cfg, seed=4)
    model = flux_from_bfl({f"model.diffusion_model.{k}": v for k, v in state.items()}, cfg)
    qkv = np.asarray(model.double_blocks.img_attn.qkv.kernel[...])
    assert qkv.shape == (cfg.depth, cfg.hidden_size, 3 * cfg.hidden_size)
    np.testing.assert_array_equal(qkv[2], state["double_blocks.2.img_attn.qkv.weight"].T)


@pytest.mark.parametrize(
    "corrupt",
    [
        ("missing", "single_blocks.0.linear2.bias"),
        ("extra", "double_blocks.0.img_attn.extra.weight"),
        ("shape", "double_blocks.1.txt_mlp.0.weight"),
    ],
    ids=lambda c: c[0],
)
def test_bfl_errors_name_the_key(corrupt):
    kind, key = corrupt
    cfg = flux_config("guidance")
    state = random_bfl_state(cfg, seed=5)
    if kind == "missing":
        del state[key]
    elif kind == "extra":
        state[key] = np.zeros((2, 2), np.float32)
    else:
        state[key] = state[key][:-1]
    with pytest.raises((KeyError, ValueError), match=key.replace(".", r"\.")):
        flux_from_bfl(state, cfg)


@pytest.mark.parametrize(
    "corrupt",
    [
        ("missing", "transformer_blocks.0.attn.to_k.weight"),
        ("extra", "single_transformer_blocks.0.attn.to_out.0.weight"),
        ("shape", "single_transformer_blocks.0.proj_mlp.bias"),
    ],
    ids=lambda c: c[0],
)
def test_diffusers_errors_name_the_key(corrupt):
    kind, key = corrupt
    cfg = flux_config("guidance")
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in diffusers_model(cfg).state_dict().items()}
    if kind == "missing":
        del state[key]
    elif kind == "extra":
        state[key] = np.zeros((2, 2), np.float32)
    else:
        state[key] = state[key][:-1]
    with pytest.raises((KeyError, ValueError), match=key.replace(".", r"\.")):
        flux_from_diffusers(state, cfg)


def test_guidance_mismatch_is_reported():
    cfg = flux_config("guidance")
    state = random_bfl_state(cfg, seed=6)
    no_guidance = FluxConfig(**{**cfg.__dict__, "guidance_embed": False})
    with pytest.raises(ValueError, match="guidance_in"):
        flux_from_bfl(state, no_guidance)


def test_flux1_dev_parameter_count():
    model = nnx.eval_shape(lambda: Flux(FluxConfig.flux1_dev()))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == 11_901_408_320


def test_compiled_program_does_not_grow_with_depth():
    """The blocks run in a scan: a 19 + 38 block model lowers to the same program as a 1 + 1 block one."""

    def hlo_size(depth: int, single: int) -> int:
        cfg = FluxConfig(
            **{**flux_config("guidance").__dict__, "depth": depth, "depth_single_blocks": single}
        )
        model = nnx.eval_shape(lambda: Flux(cfg, remat_policy="dots_saveable"))
        graphdef, state = nnx.split(model)
        x = random_inputs(cfg, seed=0)
        ids = lambda a: np.broadcast_to(a, (2, *a.shape))  # noqa: E731

        def loss(state):
            out = nnx.merge(graphdef, state)(
                x["img"],
                ids(x["img_ids"]),
                x["txt"],
                ids(x["txt_ids"]),
                x["timesteps"],
                x["y"],
                x["guidance"],
            )
            return jnp.mean(out**2)

        return len(jax.jit(jax.grad(loss)).lower(state).as_text())

    small, flux_depth = hlo_size(1, 1), hlo_size(19, 38)
    assert flux_depth < 1.05 * small, (small, flux_depth)


def test_no_qkv_bias_imports_from_diffusers_with_zero_biases():
    cfg = FluxConfig(**{**flux_config("guidance").__dict__, "qkv_bias": False})
    torch.manual_seed(1)
    ref_model = diffusers_model(cfg)
    for i in range(cfg.depth):  # BFL without qkv_bias == diffusers with zero q/k/v biases in double blocks
        for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            ref_model.get_parameter(f"transformer_blocks.{i}.attn.{m}.bias").data.zero_()
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    biased = "transformer_blocks.1.attn.add_k_proj.bias"
    with pytest.raises(ValueError, match=biased.replace(".", r"\.")):
        flux_from_diffusers({**state, biased: np.ones_like(state[biased])}, cfg)
    ours = flux_from_diffusers(state, cfg)
    assert ours.double_blocks.img_attn.qkv.bias is None
    x = random_inputs(cfg, seed=7)
    assert_close(run_ours(ours, cfg, x), run_diffusers(ref_model, cfg, x))
