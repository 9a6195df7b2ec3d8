"""Seeding our networks from pretrained FLUX.1 weights (`config.init`): the transformer and the autoencoders.

port.py imports a FLUX model as it is; here a FLUX.1 checkpoint (BFL or diffusers keys, detected from the
keys) seeds networks that differ from FLUX. Each `seed_*` function takes a state dict and the shapes of the
model's parameters ({path: shape}, paths as in `nnx.to_flat_state`) and returns the values of the parameters
it seeds (NumPy, our layout) with a `SeedReport` of what was loaded, extended, left fresh or skipped; a
parameter not in the returned values keeps its fresh initialisation.

CloudRemovalFlux from a FLUX.1 transformer:

    double_blocks, single_blocks, time_in, final_layer   loaded exactly
    guidance_in          loaded when both have it; the checkpoint's is skipped for a model without guidance
                         embedding; a model with one keeps it fresh if the checkpoint has none
    vector_in            loaded if vec_in_dim matches, else fresh
    img_in               FLUX's 64 inputs (16 latent channels x 2x2 patch, the same (c ph pw) order) are the
                         first 64 rows of our kernel; the 4 cloud-probability rows are zero, so at the start
                         the image stream sees exactly FLUX's embedding of the latent patch; bias loaded
    txt_in               fresh when the widths differ (FLUX's 4096 T5 features vs our 64 SAR latent values)
    cloud_encoder, null_sar, null_cloudy                 fresh (not in FLUX)

Any other shape difference (another hidden size, depth or head count) is an error naming the parameter and
both shapes, as is a checkpoint key nothing reads.

An autoencoder from the FLUX VAE (BFL ae.safetensors or diffusers AutoencoderKL, 16 latent channels): every
parameter but the band-facing ones loads exactly (the model's widths must be FLUX's; the tiny variant's are
not, and fails naming the first parameter). A band set holding B04, B03, B02 maps onto FLUX's R, G, B:

    encoder.conv_in   the kernel columns of B04, B03, B02 are FLUX's R, G, B columns, every other band's
                      are zero, so the encoder starts as FLUX's RGB encoder of the true-colour bands
    decoder.conv_out  the rows (kernel and bias) of B04, B03, B02 are FLUX's R, G, B rows; every other band's
                      are the mean of the three, a grey (brightness) estimate: the non-visible bands of land
                      scenes follow overall brightness far better than a constant would

so a 3-band "rgb" model is FLUX's VAE exactly. Sentinel-1 (VV, VH) has no RGB counterpart: refused. The
latent scale and shift are not in the checkpoint; the latent_stats stage measures them as for any VAE.

Memory: the host holds the whole state dict in float32 (48 GB for FLUX.1-dev's 12B parameters) plus the
stacked copies of the block parameters, about twice that at the peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from crrf_jax.models import port

ParamPath = tuple  # a parameter's path in nnx.to_flat_state: ('flux', 'img_in', 'kernel'), ('null_sar',)
CLOUD_COLUMNS = 4  # img_in inputs of CloudRemovalFlux beyond FLUX's: the pooled cloud probability, 2x2 patch


@dataclasses.dataclass
class SeedReport:
    """What seeding did, per module of the model (a list of "name: reason" lines each)."""

    source: str
    format: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    extended: list[str] = dataclasses.field(default_factory=list)
    fresh: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # checkpoint modules the model has no use for

    def __str__(self) -> str:
        lines = [f"seeded from {self.source} ({self.format} format)"]
        for kind in ("loaded", "extended", "fresh", "skipped"):
            items = getattr(self, kind)
            if items:
                lines.append(f"  {kind}: " + "; ".join(items))
        return "\n".join(lines)


def _name(path: Sequence) -> str:
    return "/".join(str(p) for p in path)


def _mismatch(source: str, name: str, ours, theirs) -> ValueError:
    return ValueError(f"{source}: parameter {name} has shape {tuple(ours)} in the model but {tuple(theirs)} in "
                      f"the checkpoint (a model of other sizes than the checkpoint's cannot be seeded from it)")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A safetensors file, or a folder of one (diffusers' `diffusion_pytorch_model.safetensors`) or of shards
    listed by a `*.safetensors.index.json`, as {key: float32 array}."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return port.load_safetensors(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if len(indexes) == 1:
        with open(os.path.join(path, indexes[0])) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif not indexes:
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(shards) != 1:
            raise ValueError(f"{path}: a checkpoint folder needs one .safetensors file or a "
                             f".safetensors.index.json of shards; found {len(shards)} .safetensors files")
    else:
        raise ValueError(f"{path}: several .safetensors.index.json files {indexes}; pass the file itself")
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        out.update(port.load_safetensors(os.path.join(path, shard)))
    return out


# --------------------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------------------


def flux_format(state_dict: Mapping[str, np.ndarray], source: str) -> str:
    """'bfl' (double_blocks.0.img_attn.qkv.weight, ...) or 'diffusers' (transformer_blocks.0.attn.to_q...)."""
    keys = list(state_dict)
    if any(k.startswith(("double_blocks.", "single_blocks.", "model.diffusion_model.")) for k in keys):
        return "bfl"
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in keys):
        return "diffusers"
    raise ValueError(f"{source}: not a FLUX transformer checkpoint: neither BFL keys (double_blocks.0...) nor "
                     f"diffusers keys (transformer_blocks.0...); its first keys are {sorted(keys)[:4]}")


def _diffusers_flux_config(sd: Mapping[str, np.ndarray], source: str):
    """The FluxConfig of a diffusers FluxTransformer2DModel state dict, read from its shapes (RoPE axes are not
    in it and do not matter for the weights)."""
    from crrf_jax.models.flux import FluxConfig

    def count(prefix):
        return len({m.group(1) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))})

    depth, single = count("transformer_blocks"), count("single_transformer_blocks")
    block = "transformer_blocks.0" if depth else "single_transformer_blocks.0"
    try:
        hidden, in_channels = np.shape(sd["x_embedder.weight"])
        head_dim = np.shape(sd[f"{block}.attn.norm_q.weight"])[0]
        mlp = np.shape(sd[f"{block}.ff.net.0.proj.weight" if depth else f"{block}.proj_mlp.weight"])[0]
        return FluxConfig(
            in_channels=in_channels, out_channels=np.shape(sd["proj_out.weight"])[0],
            vec_in_dim=np.shape(sd["time_text_embed.text_embedder.linear_1.weight"])[1],
            context_in_dim=np.shape(sd["context_embedder.weight"])[1], hidden_size=hidden,
            mlp_ratio=mlp / hidden, num_heads=hidden // head_dim, depth=depth, depth_single_blocks=single,
            axes_dim=(head_dim,), theta=10_000, qkv_bias=f"{block}.attn.to_q.bias" in sd,
            guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in sd,
        )
    except KeyError as e:
        raise ValueError(f"{source}: diffusers FLUX transformer state dict without {e.args[0]!r}") from None


def bfl_flux_state(state_dict: Mapping[str, np.ndarray], source: str) -> tuple[dict[str, np.ndarray], str]:
    """The state dict with BFL keys (diffusers' converted by port.flux_diffusers_to_bfl), and its format."""
    fmt = flux_format(state_dict, source)
    if fmt == "diffusers":
        return port.flux_diffusers_to_bfl(state_dict, _diffusers_flux_config(state_dict, source)), fmt
    prefix = "model.diffusion_model."
    if all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}, fmt
    return dict(state_dict), fmt


class _FluxCheckpoint:
    """A BFL-key state dict read by our Flux parameter paths (without the leading 'flux')."""

    def __init__(self, bfl: dict[str, np.ndarray], source: str):
        self.bfl, self.source = bfl, source
        self.reader = port.StateDictReader(bfl, source)
        self.layers = {s: len({k.split(".")[1] for k in bfl if k.startswith(s + ".")}) for s in port.FLUX_STACKS}

    def has(self, module: str) -> bool:
        return any(k.startswith(module + ".") for k in self.bfl)

    def _keys(self, sub: ParamPath) -> list[str]:
        if sub[0] in port.FLUX_STACKS:
            return [port.flux_bfl_key(sub, i) for i in range(self.layers[sub[0]])]
        return [port.flux_bfl_key(sub, None)]

    def shape(self, sub: ParamPath) -> tuple[int, ...]:
        """The parameter's shape in our layout ((layers, in, out) for stacked kernels)."""
        keys = self._keys(sub)
        if not keys:
            return (0,)
        if keys[0] not in self.bfl:
            raise KeyError(f"{self.source}: missing key {keys[0]!r} (for parameter flux/{_name(sub)})")
        shape = tuple(np.shape(self.bfl[keys[0]]))
        shape = shape[::-1] if sub[-1] == "kernel" else shape
        return (len(keys), *shape) if sub[0] in port.FLUX_STACKS else shape

    def value(self, sub: ParamPath) -> np.ndarray:
        arrays = [self.reader.take(k) for k in self._keys(sub)]
        arrays = [a.T if sub[-1] == "kernel" else a for a in arrays]
        return np.stack(arrays) if sub[0] in port.FLUX_STACKS else arrays[0]

    def skip(self, module: str) -> None:
        for key in [k for k in self.bfl if k.startswith(module + ".")]:
            self.reader.take(key)


def _flux_module_rule(ckpt: _FluxCheckpoint, module: str, shapes: dict[ParamPath, tuple]) -> tuple[str, str]:
    """(kind, reason) for one module of our Flux: kind is loaded, extended or fresh."""
    if not ckpt.has(module):
        return "fresh", "not in the checkpoint"
    if module in ("txt_in", "vector_in"):
        sub = (module, "kernel") if module == "txt_in" else (module, "in_layer", "kernel")
        theirs, ours = ckpt.shape(sub), shapes[sub]
        if theirs[0] != ours[0] and theirs[1:] == ours[1:]:
            return "fresh", f"input width {theirs[0]} in the checkpoint, {ours[0]} in the model"
    if module == "img_in":
        theirs, ours = ckpt.shape(("img_in", "kernel")), shapes[("img_in", "kernel")]
        if ours[0] == theirs[0] + CLOUD_COLUMNS and ours[1:] == theirs[1:]:
            return "extended", (f"the checkpoint's {theirs[0]} inputs, then {CLOUD_COLUMNS} zero "
                                f"cloud-probability inputs")
    return "loaded", ""


def _extend_rows(value: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([value, np.zeros((rows - value.shape[0], *value.shape[1:]), value.dtype)])


def seed_flux(state_dict: Mapping[str, np.ndarray], shapes: Mapping[ParamPath, tuple], source: str):
    """Values of a CloudRemovalFlux's parameters (`shapes`: {path: shape} of all of them) seeded from a FLUX.1
    transformer state dict (see the module docstring) -> ({path: float32 array}, SeedReport)."""
    bfl, fmt = bfl_flux_state(state_dict, source)
    ckpt, report = _FluxCheckpoint(bfl, f"{source} ({fmt} FLUX)"), SeedReport(source, fmt)
    ours = {tuple(p[1:]): tuple(s) for p, s in shapes.items() if p[0] == "flux"}
    values: dict[ParamPath, np.ndarray] = {}
    for module in sorted({sub[0] for sub in ours}):
        kind, why = _flux_module_rule(ckpt, module, ours)
        getattr(report, kind).append(f"flux/{module}" + (f" ({why})" if why else ""))
        if kind == "fresh":
            ckpt.skip(module)
            continue
        for sub in (s for s in ours if s[0] == module):
            theirs = ckpt.shape(sub)
            if kind == "extended" and sub[-1] == "kernel":
                values[("flux", *sub)] = _extend_rows(ckpt.value(sub), ours[sub][0])
                continue
            if theirs != ours[sub]:
                raise _mismatch(source, "flux/" + _name(sub), ours[sub], theirs)
            values[("flux", *sub)] = ckpt.value(sub)
    for module in ("guidance_in", "vector_in", "txt_in"):
        if ckpt.has(module) and module not in {sub[0] for sub in ours}:
            report.skipped.append(f"{module} (the model has none: guidance_embed=False)")
            ckpt.skip(module)
    report.fresh.extend(sorted({_name(p[:1]) for p in shapes if p[0] != "flux"}))
    ckpt.reader.finish()
    return values, report


# --------------------------------------------------------------------------------------------------------------
# The autoencoders
# --------------------------------------------------------------------------------------------------------------

# FLUX's VAE sees R, G, B: the Sentinel-2 bands B04, B03, B02 (indices into contract.S2_BANDS).
FLUX_RGB_BANDS = (3, 2, 1)


def autoencoder_format(state_dict: Mapping[str, np.ndarray], source: str) -> str:
    """'bfl' (encoder.down.0.block.0...) or 'diffusers' (encoder.down_blocks.0.resnets.0...)."""
    keys = list(state_dict)
    if any(k.startswith("encoder.down.") for k in keys):
        return "bfl"
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers"
    raise ValueError(f"{source}: not a FLUX autoencoder checkpoint: neither BFL keys (encoder.down.0...) nor "
                     f"diffusers AutoencoderKL keys (encoder.down_blocks.0...); first keys {sorted(keys)[:4]}")


def rgb_positions(bands: Sequence[int] | None, source: str) -> tuple[int, int, int]:
    """The channels of B04, B03, B02 in a band set (indices into contract.S2_BANDS; None: Sentinel-1)."""
    from crrf_jax.data import contract

    if bands is None:
        raise ValueError(f"{source}: a FLUX VAE sees RGB images; Sentinel-1 (VV, VH) has no RGB bands to map "
                         f"onto it. Train vae_s1 from scratch (leave config.init.vae_s1 empty)")
    if not all(b in bands for b in FLUX_RGB_BANDS):
        names = [contract.S2_BANDS[b] for b in bands]
        raise ValueError(f"{source}: a FLUX VAE sees RGB; the band set {names} lacks one of B04, B03, B02, so "
                         f"it cannot seed this autoencoder (train it from scratch)")
    return tuple(list(bands).index(b) for b in FLUX_RGB_BANDS)


def _map_bands(rgb: np.ndarray, n: int, pos: tuple[int, int, int], others: str) -> np.ndarray:
    """`rgb` (..., 3), FLUX's R, G, B on the last axis -> (..., n): R, G, B at `pos`, the rest zero or the mean."""
    fill = np.zeros_like(rgb[..., :1]) if others == "zero" else rgb.mean(axis=-1, keepdims=True)
    out = np.repeat(fill, n, axis=-1)
    out[..., list(pos)] = rgb
    return out


def seed_autoencoder(state_dict: Mapping[str, np.ndarray], config, shapes: Mapping[ParamPath, tuple],
                     bands: Sequence[int] | None, source: str):
    """Values of an AutoEncoder's parameters (`config`: its AutoEncoderConfig or mapping; `shapes`: {path:
    shape} of its nnx.Params; `bands`: its Sentinel-2 band indices, None for Sentinel-1) from a FLUX VAE state
    dict by the band rule of the module docstring -> ({path: float32 array}, SeedReport)."""
    from crrf_jax.models.autoencoder import as_autoencoder_config

    config = as_autoencoder_config(config)
    pos = rgb_positions(bands, source)
    fmt = autoencoder_format(state_dict, source)
    key_of = port.ae_bfl_key if fmt == "bfl" else port.ae_diffusers_key
    reader, report = port.StateDictReader(state_dict, f"{source} ({fmt} autoencoder)"), SeedReport(source, fmt)
    band_axis = {("encoder", "conv_in", "kernel"): (2, "zero"), ("decoder", "conv_out", "kernel"): (3, "mean"),
                 ("decoder", "conv_out", "bias"): (0, "mean")}
    identity = tuple(pos) == (0, 1, 2) and len(bands) == 3
    values: dict[ParamPath, np.ndarray] = {}
    for path, shape in shapes.items():
        path, shape = tuple(path), tuple(shape)
        axis, others = band_axis.get(path, (None, None))
        want = shape if axis is None else (*shape[:axis], 3, *shape[axis + 1:])
        try:
            value = port.ae_take(reader, key_of(path, config), want, attn_as_conv=fmt == "bfl")
        except ValueError as e:
            raise ValueError(f"{source}: cannot seed parameter {_name(path)} (shape {shape}): {e}") from None
        if axis is not None and not identity:
            value = np.moveaxis(_map_bands(np.moveaxis(value, axis, -1), shape[axis], pos, others), -1, axis)
            report.extended.append(f"{_name(path)} (FLUX's R, G, B at bands {pos}, the others {others})")
        values[path] = value
    reader.finish()
    report.loaded.append(f"{len(values) - len(report.extended)} parameters exactly")
    return values, report
