"""Seeding from pretrained FLUX.1 weights (config.init): crrf_jax/models/pretrained.py and the trainer's hook.

The checkpoints are random small diffusers models written in the test (a FluxTransformer2DModel of the tiny
variant's widths with FLUX.1's flags, an AutoencoderKL of the tiny VAE's widths), in diffusers' own format
and converted to BFL keys. The reference for "loaded exactly" is port.py's import of the same checkpoint as a
plain FLUX model, which tests/test_flux_parity.py and test_autoencoder_parity.py pin against diffusers.
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from configs import common  # noqa: E402
from crrf_jax import parallel, train_lib  # noqa: E402
from crrf_jax.models import build, port  # noqa: E402
from crrf_jax.models import pretrained as P  # noqa: E402
from crrf_jax.models.flux import FluxConfig  # noqa: E402
from tests.test_autoencoder_parity import _config as ae_config  # noqa: E402
from tests.test_autoencoder_parity import _diffusers_vae  # noqa: E402
from tests.test_flux_parity import assert_close, diffusers_model  # noqa: E402

torch.set_num_threads(2)


def model_config(guidance: bool = True):
    """The tiny variant with FLUX.1-dev's flags (guidance embedding, qkv bias): hidden 64, 2 heads, 1 + 1 blocks."""
    m = common.model_config("tiny")
    m.flux.guidance_embed = guidance
    return m


# The checkpoint's own FLUX sizes: FLUX's 64 inputs and, unlike ours, a 96-wide text context.
CKPT = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=96, hidden_size=64, mlp_ratio=4.0,
                  num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 14, 14), theta=10_000, qkv_bias=True,
                  guidance_embed=True)


@pytest.fixture(scope="module")
def flux_ckpt(tmp_path_factory):
    """A random diffusers FLUX transformer saved by save_pretrained (a folder) and as a BFL-key file."""
    torch.manual_seed(0)
    model = diffusers_model(CKPT)
    with torch.no_grad():  # random RMSNorm and final-norm weights, so that their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("flux_ckpt")
    model.save_pretrained(root / "diffusers", safe_serialization=True)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_file(port.flux_diffusers_to_bfl(state, CKPT), str(root / "flux_bfl.safetensors"))
    return {"model": model, "state": state, "diffusers": root / "diffusers", "bfl": root / "flux_bfl.safetensors"}


@functools.cache
def fresh_state(guidance: bool = True):
    """A fresh train state of the narrow CloudRemovalFlux, created in its shardings as the trainer does."""
    model_fn = functools.partial(build.cloud_removal_flux, model_config(guidance))
    return train_lib.init_train_state(model_fn, optax.sgd(0.0), parallel.make_mesh({"data": -1}))


def shapes_of(params) -> dict[tuple, tuple]:
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(params)}


def flat(params) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


def seed(path, shapes=None, state=None):
    shapes = shapes or shapes_of(fresh_state().params)
    return P.seed_flux(P.read_checkpoint(path) if state is None else state, shapes, str(path))


def test_bfl_and_diffusers_files_seed_the_same_exact_values(flux_ckpt):
    values, report = seed(flux_ckpt["diffusers"])
    bfl_values, bfl_report = seed(flux_ckpt["bfl"])
    assert (report.format, bfl_report.format) == ("diffusers", "bfl")
    assert values.keys() == bfl_values.keys()
    for path in values:
        np.testing.assert_array_equal(values[path], bfl_values[path], err_msg=str(path))
    # Every loaded parameter is the checkpoint's, as port.py imports it into a plain Flux.
    reference = flat(nnx.state(port.flux_from_diffusers(flux_ckpt["state"], CKPT), nnx.Param))
    loaded = {p for p in values if p[1] not in ("img_in",)}
    assert {p[1] for p in loaded} == {"double_blocks", "single_blocks", "time_in", "vector_in", "guidance_in",
                                      "final_layer"}
    for path in loaded:
        np.testing.assert_array_equal(values[path], reference[path[1:]], err_msg=str(path))
    # img_in: FLUX's 64 latent-patch inputs first, the 4 cloud-probability inputs zero; bias as FLUX's.
    kernel = values[("flux", "img_in", "kernel")]
    assert kernel.shape == (68, 64)
    np.testing.assert_array_equal(kernel[:64], reference[("img_in", "kernel")])
    np.testing.assert_array_equal(kernel[64:], 0.0)
    np.testing.assert_array_equal(values[("flux", "img_in", "bias")], reference[("img_in", "bias")])
    # txt_in (96 wide in the checkpoint, 64 here), the cloud encoder and the null tokens stay fresh.
    assert not any(p[:2] == ("flux", "txt_in") or p[0] != "flux" for p in values)
    assert any("flux/txt_in (input width 96 in the checkpoint, 64 in the model)" in f for f in report.fresh)
    assert {"cloud_encoder", "null_sar", "null_cloudy"} <= set(report.fresh)
    assert report.extended[0].startswith("flux/img_in")


def test_placed_params_keep_fresh_ones_and_behave_as_flux(flux_ckpt):
    """place_like puts the seeded values in the state's shardings and keeps the fresh txt_in; with the
    cloud-probability inputs zero, our Flux is the checkpoint's (whose text projection is swapped for ours)."""
    state = fresh_state()
    values, _ = seed(flux_ckpt["bfl"])
    params = parallel.place_like(state.params, values)
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    got, fresh = flat(params), flat(state.params)
    for path, value in got.items():
        np.testing.assert_array_equal(value, values[path] if path in values else fresh[path], err_msg=str(path))
    new = dict(nnx.to_flat_state(params))
    for path, old in nnx.to_flat_state(state.params):
        assert new[path].get_value().sharding == old.get_value().sharding, path

    ours = nnx.merge(state.graphdef, params, state.rest).flux
    ref = flux_ckpt["model"]
    txt_in = got[("flux", "txt_in", "kernel")], got[("flux", "txt_in", "bias")]
    ref.context_embedder = torch.nn.Linear(64, 64)
    with torch.no_grad():
        ref.context_embedder.weight.copy_(torch.from_numpy(txt_in[0].T.copy()))
        ref.context_embedder.bias.copy_(torch.from_numpy(txt_in[1].copy()))
    rng = np.random.default_rng(1)
    b, n, m = 2, 8, 4
    img, txt = rng.normal(size=(b, n, 64)).astype(np.float32), rng.normal(size=(b, m, 64)).astype(np.float32)
    img_ids = np.concatenate([np.zeros((n, 1)), rng.integers(0, 8, (n, 2))], 1).astype(np.float32)
    txt_ids = np.concatenate([np.full((m, 1), 2.0), rng.integers(0, 8, (m, 2))], 1).astype(np.float32)
    t, y = rng.uniform(size=b).astype(np.float32), rng.normal(size=(b, 64)).astype(np.float32)
    g = np.full(b, 3.5, np.float32)  # FLUX.1-dev's guidance scale
    with torch.no_grad():
        expected = ref(hidden_states=torch.from_numpy(img), encoder_hidden_states=torch.from_numpy(txt),
                       pooled_projections=torch.from_numpy(y), timestep=torch.from_numpy(t),
                       img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
                       guidance=torch.from_numpy(g), return_dict=False)[0].numpy()
    batched = lambda ids: np.broadcast_to(ids, (b, *ids.shape))  # noqa: E731
    out = ours(np.concatenate([img, np.zeros((b, n, 4), np.float32)], -1), batched(img_ids), txt, batched(txt_ids),
               t, y, g)
    assert np.abs(expected).max() > 0.1
    assert_close(np.asarray(out), expected)


def test_sharded_diffusers_folder(flux_ckpt, tmp_path):
    """A folder of shards with their index json reads as the whole state dict; an ambiguous folder fails."""
    import json

    state = P.read_checkpoint(flux_ckpt["diffusers"])
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    read = P.read_checkpoint(tmp_path)
    assert read.keys() == state.keys() and all(np.array_equal(read[k], state[k]) for k in keys)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="found 2 .safetensors files"):
        P.read_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        P.read_checkpoint(tmp_path / "absent")


def test_guidance_and_vector_in_rules(flux_ckpt):
    bfl = P.read_checkpoint(flux_ckpt["bfl"])
    no_guidance = shapes_of(fresh_state(guidance=False).params)
    values, report = seed(flux_ckpt["bfl"], shapes=no_guidance)  # the checkpoint's guidance_in is skipped
    assert not any(p[1] == "guidance_in" for p in values)
    assert report.skipped == ["guidance_in (the model has none: guidance_embed=False)"]
    without = {k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}
    values, report = seed("no-guidance checkpoint", state=without)  # the model's guidance_in stays fresh
    assert not any(p[1] == "guidance_in" for p in values)
    assert "flux/guidance_in (not in the checkpoint)" in report.fresh
    shapes = shapes_of(fresh_state().params)
    shapes[("flux", "vector_in", "in_layer", "kernel")] = (48, 64)  # a model with vec_in_dim 48
    values, report = seed(flux_ckpt["bfl"], shapes=shapes)
    assert not any(p[1] == "vector_in" for p in values)
    assert "flux/vector_in (input width 64 in the checkpoint, 48 in the model)" in report.fresh


def test_other_shape_mismatches_name_the_parameter(flux_ckpt):
    bfl = P.read_checkpoint(flux_ckpt["bfl"])
    bad = dict(bfl, **{"double_blocks.0.img_mlp.0.weight": bfl["double_blocks.0.img_mlp.0.weight"][:-1]})
    with pytest.raises(ValueError, match=r"parameter flux/double_blocks/img_mlp/fc1/kernel has shape \(1, 64, 256\) "
                                         r"in the model but \(1, 64, 255\) in the checkpoint"):
        seed("bad", state=bad)
    m = model_config()  # a model of another width (hidden 96: head dim 48) than the checkpoint (64)
    m.flux.hidden_size, m.flux.axes_dim, m.flux.vec_in_dim, m.cloud_cnn.out_dim = 96, (8, 20, 20), 96, 96
    wide = shapes_of(nnx.state(nnx.eval_shape(lambda: build.cloud_removal_flux(m)), nnx.Param))
    with pytest.raises(ValueError, match=r"parameter flux/double_blocks/img_attn/norm/key_norm/scale has shape "
                                         r"\(1, 48\) in the model but \(1, 32\) in the checkpoint"):
        seed(flux_ckpt["bfl"], shapes=wide)
    with pytest.raises(ValueError, match="unexpected keys"):
        seed("extra", state=dict(bfl, **{"img_in.extra": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"not a FLUX transformer checkpoint"):
        seed("ae", state={"encoder.conv_in.weight": np.zeros((1, 1, 1, 1), np.float32)})


# --------------------------------------------------------------------------------------------------------------
# Autoencoders
# --------------------------------------------------------------------------------------------------------------

AE = dict(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, groups=8)  # the tiny variant's widths


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    """A random FLUX-layout AutoencoderKL (3 bands, 16 latent channels): its diffusers state dict, and the same
    weights under BFL keys (attention as 1x1 convs)."""
    cfg = ae_config(3, **AE)
    diffusers_state = {k: v.numpy().copy() for k, v in _diffusers_vae(cfg, seed=0).state_dict().items()}
    bfl = {}
    for path, shape in ae_shapes(3).items():
        value = diffusers_state[port.ae_diffusers_key(path, cfg)]
        bfl[port.ae_bfl_key(path, cfg)] = value[..., None, None] if len(shape) == 2 else value
    root = tmp_path_factory.mktemp("vae_ckpt")
    save_file(diffusers_state, str(root / "diffusers.safetensors"))
    save_file(bfl, str(root / "ae.safetensors"))
    return {"cfg": cfg, "state": diffusers_state, "diffusers": root / "diffusers.safetensors",
            "bfl": root / "ae.safetensors"}


def ae_shapes(bands: int) -> dict[tuple, tuple]:
    m = common.model_config("tiny", bands)
    return shapes_of(nnx.state(nnx.eval_shape(lambda: build.autoencoder(m, "vae_s2")), nnx.Param))


@pytest.mark.parametrize("fmt", ["diffusers", "bfl"])
def test_rgb_autoencoder_loads_exactly(vae_ckpt, fmt):
    from crrf_jax.data import contract

    cfg = common.autoencoder_config("tiny", 3)
    values, report = P.seed_autoencoder(P.read_checkpoint(vae_ckpt[fmt]), cfg, ae_shapes(3),
                                        contract.resolve_bands("rgb"), fmt)
    assert report.format == fmt and not report.extended
    reference = flat(nnx.state(port.autoencoder_from_diffusers(vae_ckpt["state"], vae_ckpt["cfg"]), nnx.Param))
    assert values.keys() == reference.keys()
    for path in values:
        np.testing.assert_array_equal(values[path], reference[path], err_msg=str(path))


def test_thirteen_band_autoencoder_by_the_band_rule(vae_ckpt):
    rgb, _ = P.seed_autoencoder(vae_ckpt["state"], common.autoencoder_config("tiny", 3), ae_shapes(3), (3, 2, 1), "")
    values, report = P.seed_autoencoder(vae_ckpt["state"], common.autoencoder_config("tiny", 13), ae_shapes(13),
                                        tuple(range(13)), "vae")
    assert len(report.extended) == 3
    pos = [3, 2, 1]  # B04, B03, B02 in the 13 bands: FLUX's R, G, B
    others = [i for i in range(13) if i not in pos]
    enc, dec = ("encoder", "conv_in", "kernel"), ("decoder", "conv_out", "kernel")
    bias = ("decoder", "conv_out", "bias")
    np.testing.assert_array_equal(values[enc][:, :, pos], rgb[enc])
    np.testing.assert_array_equal(values[enc][:, :, others], 0.0)
    np.testing.assert_array_equal(values[dec][..., pos], rgb[dec])
    np.testing.assert_allclose(values[dec][..., others], np.repeat(rgb[dec].mean(-1, keepdims=True), 10, -1))
    np.testing.assert_array_equal(values[bias][pos], rgb[bias])
    np.testing.assert_allclose(values[bias][others], rgb[bias].mean())
    for path in set(values) - {enc, dec, bias}:
        np.testing.assert_array_equal(values[path], rgb[path], err_msg=str(path))


def test_autoencoder_refusals(vae_ckpt):
    state = vae_ckpt["state"]
    with pytest.raises(ValueError, match="Sentinel-1"):
        P.seed_autoencoder(state, common.autoencoder_config("tiny", 2), ae_shapes(2), None, "init.vae_s1")
    with pytest.raises(ValueError, match="lacks one of B04, B03, B02"):
        P.seed_autoencoder(state, common.autoencoder_config("tiny", 2), ae_shapes(2), (7, 3), "x")
    base = common.model_config("base", 3).vae_s2  # FLUX's widths are not the checkpoint's here
    shapes = shapes_of(nnx.state(nnx.eval_shape(lambda: build.autoencoder(common.model_config("base", 3), "vae_s2")),
                                 nnx.Param))
    with pytest.raises(ValueError, match=r"cannot seed parameter decoder/\S+ \(shape"):
        P.seed_autoencoder(state, base, shapes, (3, 2, 1), "x")


def test_validate_checks_init(tmp_path):
    from crrf_jax import config as C

    c = common.base_config("tiny")
    c.data.root = str(tmp_path)
    C.validate(c)
    c.init.flux = str(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="config.init.flux=.*no such checkpoint"):
        C.validate(c)
    c.init.flux = ""
    c.init.vae_s1 = str(tmp_path)
    with pytest.raises(ValueError, match="Sentinel-1"):
        C.validate(c)


# --------------------------------------------------------------------------------------------------------------
# End to end: the flow stage of the trainer seeded from a checkpoint
# --------------------------------------------------------------------------------------------------------------


def test_flow_stage_starts_from_the_checkpoint(flux_ckpt, tmp_path_factory, caplog):
    """train_stage with config.init.flux: the report is logged and, with a zero learning rate, the parameters
    after 2 steps are the seeded ones (the fresh txt_in, cloud encoder, null tokens as initialised)."""
    from configs import demo
    from crrf_jax import rundir, stages, trainer
    from tests.helpers import train_run as tr
    from tests.test_export import make_fake_workdir

    base = tmp_path_factory.getbasetemp()
    workdir = make_fake_workdir(tmp_path_factory.mktemp("seeded") / "run")  # trained VAEs and latent stats
    shutil.rmtree(workdir / "flow")
    config = demo.get_config()
    config.demo = False
    config.data.root, config.data.crop_size = str(tr.write_dataset(base / "synthetic")), tr.SIZE
    for key, value in dict(steps=2, batch_size=tr.BATCH, lr=0.0, warmup_steps=1, log_every=1, preview_every=0,
                           checkpoint_every=2).items():
        config.flow[key] = value
    config.init.flux = str(flux_ckpt["bfl"])
    stage = stages.make_stage("flow", config, str(workdir))
    with caplog.at_level(logging.INFO, logger="crrf_jax"):
        trainer.train_stage(stage, parallel.make_mesh({"data": -1}), lambda: False)
    assert "flow: seeded from" in caplog.text and "extended: flux/img_in" in caplog.text

    values, _ = seed(flux_ckpt["bfl"], shapes=shapes_of(fresh_state(guidance=False).params))
    saved = tr.read_checkpoint_state(Path(rundir.checkpoints_dir(rundir.stage_path(workdir, "flow"))) / "2")
    params = {path[:-1] if path[-1] == "value" else path: np.asarray(v)
              for path, v in _flat_dict(saved["params"]).items()}
    assert params.keys() == shapes_of(fresh_state(guidance=False).params).keys()
    for path, value in values.items():
        np.testing.assert_array_equal(params[path], value, err_msg=str(path))
    fresh = flat(fresh_state(guidance=False).params)  # same seed: the trainer's fresh model is this one
    for path in set(params) - set(values):
        np.testing.assert_array_equal(params[path], fresh[path], err_msg=str(path))


def _flat_dict(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        key = int(k) if isinstance(k, str) and k.isdigit() else k
        if isinstance(v, dict):
            out.update(_flat_dict(v, (*prefix, key)))
        else:
            out[(*prefix, key)] = v
    return out
