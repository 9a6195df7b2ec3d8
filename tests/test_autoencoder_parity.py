"""The FLUX autoencoder against diffusers' AutoencoderKL (random weights, float32, CPU).

Two import paths are pinned: diffusers' own state dict (autoencoder_from_diffusers) and a BFL-format state
dict (autoencoder_from_bfl), which diffusers loads through its single-file converter
(convert_ldm_vae_checkpoint).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

from crrf_jax.models.autoencoder import AutoEncoderConfig  # noqa: E402
from crrf_jax.models.port import autoencoder_from_bfl, autoencoder_from_diffusers  # noqa: E402

torch.set_num_threads(2)
TOL = 1e-4  # max abs error relative to the output's max abs value


def _config(bands: int, ch: int, ch_mult, num_res_blocks: int, groups: int, **kw) -> AutoEncoderConfig:
    return AutoEncoderConfig(
        resolution=32, in_channels=bands, ch=ch, out_ch=bands, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        z_channels=16, norm_groups=groups, **kw,
    )


def _diffusers_vae(cfg: AutoEncoderConfig, seed: int):
    """A FLUX-layout AutoencoderKL with random weights, GroupNorm affine parameters randomised too."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.ch_mult),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1)
    return vae


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close(ours, ref: np.ndarray, what: str) -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(ours - ref).max()) / scale
    assert err < TOL, f"{what}: max abs error / scale = {err:.2e} (scale {scale:.3g})"


def _compare(ours_model, vae, cfg: AutoEncoderConfig, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, size, size, cfg.in_channels)).astype(np.float32)
    f = cfg.downsample_factor
    z = rng.normal(0, 1, (2, size // f, size // f, cfg.z_channels)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(_nchw(x)).latent_dist
        # The reference for our scaled decode: diffusers decodes unscaled latents z / scale + shift.
        ref_dec = vae.decode(_nchw(z / cfg.scale_factor + cfg.shift_factor)).sample
    posterior = ours_model.encode_posterior(jnp.asarray(x))
    _assert_close(posterior.mean, _nhwc(dist.mean), "posterior mean")
    _assert_close(posterior.logvar, _nhwc(dist.logvar), "posterior logvar")
    _assert_close(ours_model.encode(jnp.asarray(x)),
                  cfg.scale_factor * (_nhwc(dist.mean) - cfg.shift_factor), "scaled latent")
    _assert_close(ours_model.decode(jnp.asarray(z)), _nhwc(ref_dec), "decoder output")


@pytest.mark.parametrize(
    "bands, ch, ch_mult, num_res_blocks, groups",
    [
        (3, 16, (1, 2, 2, 2), 1, 8),  # RGB, like FLUX's VAE in miniature
        (13, 16, (1, 2, 2, 2), 2, 4),  # Sentinel-2
        (2, 32, (1, 1, 2, 2), 1, 16),  # Sentinel-1
    ],
)
def test_matches_diffusers(bands, ch, ch_mult, num_res_blocks, groups):
    cfg = _config(bands, ch, ch_mult, num_res_blocks, groups, scale_factor=0.7, shift_factor=0.2)
    vae = _diffusers_vae(cfg, seed=bands)
    state_dict = {k: v.numpy() for k, v in vae.state_dict().items()}
    ours = autoencoder_from_diffusers(state_dict, cfg)
    _compare(ours, vae, cfg, size=32, seed=bands)


# ------------------------------------------------------------------------------------------------------------
# BFL format
# ------------------------------------------------------------------------------------------------------------


def _bfl_shapes(cfg: AutoEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every key and PyTorch shape of BFL's flux/modules/autoencoder.py AutoEncoder, built as BFL does."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k=3):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{proj}", c, c, 1)
        resnet(f"{name}.block_2", c, c)

    n = len(cfg.ch_mult)
    conv("encoder.conv_in", cfg.in_channels, cfg.ch)
    in_mult = (1, *cfg.ch_mult)
    for i in range(n):
        cin, cout = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", cout, cout)
    top = cfg.ch * cfg.ch_mult[-1]
    mid("encoder.mid", top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", top, 2 * cfg.z_channels)

    conv("decoder.conv_in", cfg.z_channels, top)
    mid("decoder.mid", top)
    cin = top
    for i in reversed(range(n)):
        cout = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cout, cout)
    norm("decoder.norm_out", cfg.ch * cfg.ch_mult[0])
    conv("decoder.conv_out", cfg.ch * cfg.ch_mult[0], cfg.out_ch)
    return shapes


def _random_bfl_state_dict(cfg: AutoEncoderConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in _bfl_shapes(cfg).items():
        if len(shape) == 1 and "norm" in key and key.endswith("weight"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif len(shape) == 1:
            out[key] = rng.uniform(-0.2, 0.2, shape).astype(np.float32)
        else:
            bound = 1.0 / np.sqrt(np.prod(shape[1:]))  # PyTorch's default init range
            out[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return out


@pytest.mark.parametrize("bands, groups", [(3, 8), (13, 4)])
def test_bfl_state_dict_matches_diffusers_single_file_conversion(bands, groups):
    cfg = _config(bands, 16, (1, 2, 2, 2), 1, groups, scale_factor=0.3611, shift_factor=0.1159)
    bfl = _random_bfl_state_dict(cfg, seed=bands)
    ours = autoencoder_from_bfl(bfl, cfg)

    vae = _diffusers_vae(cfg, seed=0)
    converted = convert_ldm_vae_checkpoint(
        {k: torch.from_numpy(v) for k, v in bfl.items()},
        {"down_block_types": vae.config.down_block_types, "up_block_types": vae.config.up_block_types},
    )
    vae.load_state_dict(converted, strict=True)  # every diffusers parameter comes from the BFL dict
    _compare(ours, vae, cfg, size=32, seed=bands + 1)


# ------------------------------------------------------------------------------------------------------------
# Import errors name the key
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bfl():
    from configs.common import autoencoder_config

    cfg = autoencoder_config("tiny", 3)  # a ConfigDict is accepted as the config
    return cfg, _random_bfl_state_dict(AutoEncoderConfig.from_mapping(cfg), seed=0)


def test_import_accepts_configdict_and_dtype(tiny_bfl):
    cfg, sd = tiny_bfl
    model = autoencoder_from_bfl(sd, cfg, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16 and model.config.in_channels == 3
    np.testing.assert_array_equal(
        np.asarray(model.encoder.down[1].block[0].nin_shortcut.kernel.get_value()),
        sd["encoder.down.1.block.0.nin_shortcut.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(model.decoder.mid.attn_1.proj_out.kernel.get_value()),
        sd["decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0].T,
    )
    assert float(model.scale_factor.get_value()) == cfg.scale_factor


def test_missing_key_is_named(tiny_bfl):
    cfg, sd = tiny_bfl
    broken = {k: v for k, v in sd.items() if k != "decoder.up.2.upsample.conv.bias"}
    with pytest.raises(KeyError, match="missing key 'decoder.up.2.upsample.conv.bias'"):
        autoencoder_from_bfl(broken, cfg)


def test_unexpected_key_is_named(tiny_bfl):
    cfg, sd = tiny_bfl
    with pytest.raises(ValueError, match="unexpected keys.*'quant_conv.weight'"):
        autoencoder_from_bfl({**sd, "quant_conv.weight": np.zeros((32, 32, 1, 1), np.float32)}, cfg)


def test_misshaped_key_is_named(tiny_bfl):
    cfg, sd = tiny_bfl
    key = "encoder.mid.attn_1.q.weight"
    with pytest.raises(ValueError, match=rf"key '{key}' has shape \(32, 32\), expected \(32, 32, 1, 1\)"):
        autoencoder_from_bfl({**sd, key: sd[key][:, :, 0, 0]}, cfg)


def test_band_mismatch_is_explained(tiny_bfl):
    from configs.common import autoencoder_config

    _, sd = tiny_bfl  # a 3-band (RGB, FLUX-like) checkpoint
    message = r"'encoder.conv_in.weight' is for 3 bands, but config.in_channels = 13"
    with pytest.raises(ValueError, match=message):
        autoencoder_from_bfl(sd, autoencoder_config("tiny", 13))
    rgb_to_s1 = dict(autoencoder_config("tiny", 3), out_ch=2)
    with pytest.raises(ValueError, match=r"'decoder.conv_out.weight' is for 3 bands, but config.out_ch = 2"):
        autoencoder_from_diffusers(sd, rgb_to_s1)


def test_kl_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from crrf_jax.models.autoencoder import DiagonalGaussian

    moments = np.random.default_rng(0).normal(0, 2, (2, 4, 4, 32)).astype(np.float32)
    moments[0, 0, 0, 20] = -50.0  # beyond the log-variance clamp
    ours = DiagonalGaussian.from_moments(jnp.asarray(moments))
    ref = DiagonalGaussianDistribution(_nchw(moments))
    _assert_close(ours.logvar, _nhwc(ref.logvar), "logvar")
    _assert_close(ours.std, _nhwc(ref.std), "std")
    _assert_close(ours.kl(), ref.kl().numpy(), "kl")
