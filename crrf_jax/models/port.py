"""Weight import from BFL (black-forest-labs/flux) and diffusers state dicts.

A state dict maps parameter names to NumPy arrays (PyTorch layout: Linear weights are (out, in), conv weights
(out, in, kh, kw)). Each importer builds our NNX module from its config, then fills every parameter from the
state dict; a missing, unexpected or mis-shaped key is an error that names the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into {name: float32 NumPy array}; bfloat16 and float16 tensors are upcast."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    out: dict[str, np.ndarray] = {}
    try:
        # The flax (NumPy) frontend of safetensors reads bfloat16 through ml_dtypes.
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                out[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return out


class StateDictReader:
    """Hands out state-dict entries by name and reports missing, mis-shaped and unused keys."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str):
        self._sd = {k: np.asarray(v) for k, v in state_dict.items()}
        self._used: set[str] = set()
        self._source = source

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The array under `key` (as float32), checked against `shape` when given."""
        if key not in self._sd:
            raise KeyError(f"{self._source} state dict: missing key {key!r}")
        value = self._sd[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{self._source} state dict: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        self._used.add(key)
        return value.astype(np.float32, copy=False)  # no copy of float32 (FLUX.1 is 48 GB)

    def finish(self) -> None:
        """Raises if any key of the state dict was never taken."""
        unused = sorted(set(self._sd) - self._used)
        if unused:
            more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
            raise ValueError(f"{self._source} state dict: unexpected keys {unused[:5]}{more}")


# --------------------------------------------------------------------------------------------------------------
# FLUX transformer (BFL and diffusers key formats)
# --------------------------------------------------------------------------------------------------------------

# Our parameter paths mirror BFL's module names: Flux.double_blocks.img_attn.qkv.kernel (stacked over
# layers) is BFL's double_blocks.{i}.img_attn.qkv.weight; Linear kernels are (in, out) here and (out, in) in
# PyTorch. diffusers splits BFL's fused qkv (and, in single blocks, qkv + mlp) into
# to_q/to_k/to_v(/proj_mlp), renames most modules and stores the final adaLN as (scale, shift) instead of
# BFL's (shift, scale).

_FLUX_RENAMES = {"fc1": "0", "fc2": "2", "adaLN_modulation": "adaLN_modulation.1", "kernel": "weight"}
FLUX_STACKS = ("double_blocks", "single_blocks")


def _flux_abstract(config, flux_kwargs):
    from flax import nnx

    from crrf_jax.models.flux import Flux, _as_flux_config

    config = _as_flux_config(config)
    flux_kwargs = {k: v for k, v in flux_kwargs.items() if k != "rngs"}  # every weight comes from the dict
    return config, nnx.eval_shape(lambda: Flux(config, **flux_kwargs))


def _flux_params(model):
    """(our path tuple, Variable) for each Param of a Flux."""
    from flax import nnx

    return [(tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def flux_bfl_key(path: tuple[str, ...], layer: int | None) -> str:
    """The BFL key of our Flux parameter `path` (e.g. ('double_blocks', 'img_mlp', 'fc1', 'kernel')) in layer
    `layer` of a stacked module (None outside the stacks): double_blocks.{layer}.img_mlp.0.weight."""
    names = [_FLUX_RENAMES.get(p, p) for p in path]
    if layer is not None:
        names.insert(1, str(layer))
    return ".".join(names)


def flux_bfl_shapes(config, **flux_kwargs) -> dict[str, tuple[int, ...]]:
    """BFL state-dict keys of a Flux with `config` -> their shapes in PyTorch layout."""
    _, model = _flux_abstract(config, flux_kwargs)
    shapes = {}
    for path, var in _flux_params(model):
        shape = tuple(var.get_value().shape)
        layers = [None]
        if path[0] in FLUX_STACKS:
            layers, shape = range(shape[0]), shape[1:]
        if path[-1] == "kernel":
            shape = shape[::-1]
        for i in layers:
            shapes[flux_bfl_key(path, i)] = shape
    return shapes


def flux_from_bfl(state_dict: Mapping[str, np.ndarray], config, **flux_kwargs):
    """A Flux (crrf_jax.models.flux) with `config` and weights from a BFL-format state dict
    (black-forest-labs/flux key names, e.g. double_blocks.0.img_attn.qkv.weight; an optional
    'model.diffusion_model.' prefix is dropped). flux_kwargs (dtype, remat_policy) go to Flux."""
    import jax.numpy as jnp
    from flax import nnx

    prefix = "model.diffusion_model."
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    reader = StateDictReader(state_dict, "BFL FLUX")
    _, model = _flux_abstract(config, flux_kwargs)
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        stacked = path[0] in FLUX_STACKS
        per_layer = shape[1:] if stacked else shape
        torch_shape = per_layer[::-1] if path[-1] == "kernel" else per_layer
        layers = range(shape[0]) if stacked else [None]
        values = []
        for i in layers:
            w = reader.take(flux_bfl_key(path, i), torch_shape)
            values.append(w.T if path[-1] == "kernel" else w)
        value = np.stack(values) if stacked else values[0]
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    reader.finish()
    return nnx.merge(graphdef, state)


# BFL module -> diffusers module(s), within a double block, a single block, or at the top level.
# Several diffusers modules are concatenated along the output axis into one BFL module.
_DIFFUSERS_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DIFFUSERS_SINGLE = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
    "linear2": ("proj_out",),
}
_DIFFUSERS_TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}


def _diffusers_sources(bfl_key: str) -> tuple[tuple[str, ...], str]:
    """The diffusers keys whose concatenation is `bfl_key`, and the BFL parameter name (weight/bias/scale)."""
    module, param = bfl_key.rsplit(".", 1)
    stack, _, rest = module.partition(".")
    if stack in FLUX_STACKS:
        layer, _, inner = rest.partition(".")
        table = _DIFFUSERS_DOUBLE if stack == "double_blocks" else _DIFFUSERS_SINGLE
        block = "transformer_blocks" if stack == "double_blocks" else "single_transformer_blocks"
        prefix = f"{block}.{layer}."
        modules = tuple(prefix + m for m in table[inner])
    else:
        modules = _DIFFUSERS_TOP[module]
    return tuple(f"{m}.{'weight' if param == 'scale' else param}" for m in modules), param


def flux_diffusers_to_bfl(
    state_dict: Mapping[str, np.ndarray], config, **flux_kwargs
) -> dict[str, np.ndarray]:
    """Converts a diffusers FluxTransformer2DModel state dict to BFL keys (checked against `config`)."""
    reader = StateDictReader(state_dict, "diffusers FLUX")
    config, _ = _flux_abstract(config, {})
    hidden = config.hidden_size
    out: dict[str, np.ndarray] = {}
    for key, shape in flux_bfl_shapes(config, **flux_kwargs).items():
        sources, param = _diffusers_sources(key)
        if len(sources) == 1:
            sizes = [shape[0]]
        elif len(sources) == 3:
            sizes = [shape[0] // 3] * 3
        else:  # single-block linear1: q, k, v, mlp
            sizes = [hidden] * 3 + [shape[0] - 3 * hidden]
        parts = [reader.take(src, (n, *shape[1:])) for src, n in zip(sources, sizes)]
        value = np.concatenate(parts, axis=0)
        if key.startswith("final_layer.adaLN_modulation"):
            scale, shift = np.split(value, 2, axis=0)  # diffusers stores (scale, shift); BFL (shift, scale)
            value = np.concatenate([shift, scale], axis=0)
        out[key] = value
    if not config.qkv_bias:  # diffusers always has q/k/v biases; BFL without qkv_bias means they are zero
        for i in range(config.depth):
            for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                key = f"transformer_blocks.{i}.attn.{m}.bias"
                if key in reader and np.any(reader.take(key, (hidden,))):
                    raise ValueError(
                        f"diffusers FLUX state dict: {key!r} is non-zero but config has qkv_bias=False"
                    )
    reader.finish()
    return out


def flux_from_diffusers(state_dict: Mapping[str, np.ndarray], config, **flux_kwargs):
    """A Flux with `config` and weights from a diffusers FluxTransformer2DModel state dict (patch_size 1)."""
    return flux_from_bfl(flux_diffusers_to_bfl(state_dict, config, **flux_kwargs), config, **flux_kwargs)


# --------------------------------------------------------------------------------------------------------------
# FLUX autoencoder (BFL and diffusers key formats)
# --------------------------------------------------------------------------------------------------------------

# Our parameter paths mirror BFL's module names (encoder.down.{i}.block.{j}.conv1.kernel, ...), so a BFL key
# is the path with kernel/scale -> weight. Layout changes: conv (out, in, kh, kw) -> (kh, kw, in, out); the
# mid attention's q/k/v/proj_out are 1x1 convs in BFL, (out, in, 1, 1), and Linear in diffusers, (out, in);
# ours are Linear kernels (in, out). diffusers renames blocks (down_blocks.{i}.resnets.{j}, up_blocks numbered
# from the lowest resolution, mid_block.resnets.{0,1} / attentions.0, conv_norm_out, nin_shortcut ->
# conv_shortcut, norm -> group_norm, q -> to_q, proj_out -> to_out.0). Only the FLUX layout is accepted: no
# quant_conv / post_quant_conv (their keys are reported as unexpected). scale_factor / shift_factor are not in
# either state dict; they come from `config` (FLUX.1: 0.3611 / 0.1159, AutoEncoderConfig's defaults).
#
# Band counts: a checkpoint loads only into an autoencoder with the same in_channels / out_ch (a pretrained
# FLUX VAE has 3 bands); any other count fails with an error naming encoder.conv_in.weight or
# decoder.conv_out.weight and both band counts. A 13-band Sentinel-2 VAE can be seeded from FLUX's RGB one
# (crrf_jax/models/pretrained.py, config.init.vae_s2); the 2-band Sentinel-1 VAE trains from scratch.

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from crrf_jax.models.autoencoder import AutoEncoder, AutoEncoderConfig, as_autoencoder_config  # noqa: E402

_AE_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_AE_DIFFUSERS_RESNET = {"nin_shortcut": "conv_shortcut"}
_AE_DIFFUSERS_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ae_bfl_key(path: tuple, config: AutoEncoderConfig) -> str:
    return ".".join(str(p) for p in path[:-1]) + "." + _AE_LEAF[path[-1]]


def ae_diffusers_key(path: tuple, config: AutoEncoderConfig) -> str:
    part, *mod, leaf = path
    if mod[0] in ("down", "up"):
        # (down|up, level, block, j, layer) or (down, level, downsample, conv) / (up, level, upsample, conv)
        level = mod[1] if mod[0] == "down" else len(config.ch_mult) - 1 - mod[1]
        if mod[2] == "block":
            name = [f"{mod[0]}_blocks", level, "resnets", mod[3], _AE_DIFFUSERS_RESNET.get(mod[4], mod[4])]
        else:
            name = [f"{mod[0]}_blocks", level, mod[2] + "rs", 0, "conv"]  # downsamplers.0 / upsamplers.0
    elif mod[0] == "mid" and mod[1] == "attn_1":
        name = ["mid_block", "attentions", 0, _AE_DIFFUSERS_ATTN[mod[2]]]
    elif mod[0] == "mid":
        name = ["mid_block", "resnets", int(mod[1][-1]) - 1, _AE_DIFFUSERS_RESNET.get(mod[2], mod[2])]
    elif mod[0] == "norm_out":
        name = ["conv_norm_out"]
    else:
        name = list(mod)  # conv_in, conv_out
    return ".".join(str(p) for p in [part, *name, _AE_LEAF[leaf]])


def _ae_check_bands(state_dict: Mapping[str, np.ndarray], config: AutoEncoderConfig, source: str) -> None:
    """A clear error when the checkpoint was trained for another number of bands."""
    checks = (("encoder.conv_in.weight", 1, "in_channels"), ("decoder.conv_out.weight", 0, "out_ch"))
    for key, axis, field in checks:
        if key in state_dict:
            shape = np.shape(state_dict[key])
            if len(shape) == 4 and shape[axis] != getattr(config, field):
                raise ValueError(
                    f"{source} state dict: key {key!r} is for {shape[axis]} bands, but config.{field} = "
                    f"{getattr(config, field)}; an autoencoder checkpoint only loads into one with the same "
                    f"band count (a pretrained FLUX VAE has 3)"
                )


def ae_take(reader: StateDictReader, key: str, shape: tuple[int, ...], attn_as_conv: bool) -> np.ndarray:
    """The autoencoder parameter of our `shape` under `key`, converted from PyTorch layout (shape-checked)."""
    if len(shape) == 4:  # conv kernel (kh, kw, in, out) <- (out, in, kh, kw)
        return reader.take(key, (shape[3], shape[2], shape[0], shape[1])).transpose(2, 3, 1, 0)
    if len(shape) == 2 and attn_as_conv:  # attention 1x1 conv (out, in, 1, 1) -> Linear (in, out)
        return reader.take(key, (shape[1], shape[0], 1, 1))[:, :, 0, 0].T
    if len(shape) == 2:  # Linear (out, in) -> (in, out)
        return reader.take(key, (shape[1], shape[0])).T
    return reader.take(key, shape)


def _ae_load(state_dict, config, source: str, key_of, attn_as_conv: bool, **kw) -> AutoEncoder:
    config = as_autoencoder_config(config)
    kw.pop("rngs", None)  # every parameter is overwritten: build abstractly, never initialise
    model = nnx.eval_shape(lambda: AutoEncoder(config, rngs=nnx.Rngs(0), **kw))
    _ae_check_bands(state_dict, config, source)
    reader = StateDictReader(state_dict, source)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        value = ae_take(reader, key_of(path, config), tuple(var.get_value().shape), attn_as_conv)
        var.set_value(jnp.asarray(value, jnp.float32))
    reader.finish()
    model.scale_factor.set_value(jnp.asarray(config.scale_factor, jnp.float32))
    model.shift_factor.set_value(jnp.asarray(config.shift_factor, jnp.float32))
    return model


def autoencoder_from_bfl(state_dict: Mapping[str, np.ndarray], config, **kw) -> AutoEncoder:
    """An AutoEncoder (config: AutoEncoderConfig or mapping) filled from a BFL state dict (FLUX's
    ae.safetensors: encoder.conv_in.weight, encoder.down.0.block.0.norm1.weight, ...). `kw` goes to
    AutoEncoder (e.g. dtype)."""
    return _ae_load(state_dict, config, "BFL autoencoder", ae_bfl_key, attn_as_conv=True, **kw)


def autoencoder_from_diffusers(state_dict: Mapping[str, np.ndarray], config, **kw) -> AutoEncoder:
    """An AutoEncoder filled from a diffusers AutoencoderKL state dict in the FLUX layout
    (use_quant_conv=False, use_post_quant_conv=False). `kw` goes to AutoEncoder (e.g. dtype)."""
    return _ae_load(state_dict, config, "diffusers autoencoder", ae_diffusers_key, attn_as_conv=False, **kw)
