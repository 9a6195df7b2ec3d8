"""The inference bundle: a directory that rebuilds the trained networks without the training config.

A bundle directory holds

    config.json               model sizes (flux, vae_s2, vae_s1, cloud_cnn), S2 bands, compute dtype, sampling
                              and tiling defaults, weight file names
    vae_s2.safetensors        EMA weights of the Sentinel-2 autoencoder (flat "a/b/c" keys, float32)
    vae_s1.safetensors        EMA weights of the Sentinel-1 autoencoder
    transformer.safetensors   EMA weights of the rectified-flow transformer (CloudRemovalFlux without its
                              cloud-probability encoder)
    cloud_cnn.safetensors     EMA weights of the cloud-probability encoder ("cloud_encoder/..." keys)
    refiner.safetensors       EMA weights of the pixel-space refiner (when the model has one)
    latent_stats.json         latent scale and shift of each autoencoder, measured on training data
    README.txt                what the files are and how to use them

Keys are the NNX state paths of the modules built by crrf_jax.models.build, joined with "/". No pickle.
A bundle may live in a local folder or at a URL (gs://): its files are read and written whole through
`crrf_jax.paths` (etils.epath), the safetensors as bytes.
`ModelParts` is the format in memory: `read_bundle` gives one, `write_bundle` writes one, and
crrf_jax.rundir.read_workdir reads one from a training run; `CloudRemover.from_parts` builds the networks from
it (with `abstract_network` and `fill_state`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from crrf_jax import paths
from crrf_jax.config import has_refiner, has_sar  # (re-exported: bundle configs are read with them)

FORMAT = "crrf-jax-bundle"
FORMAT_VERSION = 1
NETWORKS = ("vae_s2", "vae_s1", "flow", "refiner")
WEIGHT_FILES = {
    "vae_s2": "vae_s2.safetensors",
    "vae_s1": "vae_s1.safetensors",
    "transformer": "transformer.safetensors",
    "cloud_cnn": "cloud_cnn.safetensors",
    "refiner": "refiner.safetensors",
}
CLOUD_CNN_PREFIX = "cloud_encoder/"
CONFIG_FILE = "config.json"
LATENT_STATS_FILE = "latent_stats.json"


class BundleError(FileNotFoundError):
    """A bundle or workdir is missing a file or holds an unusable one; the message names the file."""


@dataclasses.dataclass
class ModelParts:
    """Everything needed to rebuild the networks, independent of where it was read from.

    config: the bundle config (see `bundle_config`); states: network name (`networks(config)`) ->
    flat {"a/b/c": np.ndarray} of the module's full NNX state; latent_stats: "vae_s2"/"vae_s1" ->
    {"scale_factor": float, "shift_factor": float}; source: where they came from (for error messages).
    """

    config: dict[str, Any]
    states: dict[str, dict[str, np.ndarray]]
    latent_stats: dict[str, dict[str, float]]
    source: str


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------




def networks(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The networks of a bundle config: the VAEs (vae_s1 when the model has SAR) and the flow, and the refiner
    when the model has one."""
    return tuple(n for n in NETWORKS if (n != "refiner" or has_refiner(cfg["model"]))
                 and (n != "vae_s1" or has_sar(cfg["model"])))


def _cloud_score(run_config) -> dict[str, Any]:
    """How the cloud probability the model was trained with is made (`sources.DatasetInfo`)."""
    from crrf_jax.data import sources

    return sources.dataset_info(str(run_config.data.get("dataset", "sen12mscr"))).cloud_score_config()


def bundle_config(run_config) -> dict[str, Any]:
    """The part of a training config that inference needs (the bundle's config.json)."""
    from crrf_jax.data import contract

    bands = contract.resolve_bands(run_config.data.get("bands"))
    model = run_config.model.to_dict()
    tile = int(run_config.data.crop_size)
    flow = run_config.flow
    weights = {k: v for k, v in WEIGHT_FILES.items() if (k != "refiner" or has_refiner(model))
               and (k != "vae_s1" or has_sar(model))}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": _plain(model),
        "bands": {"indices": list(bands), "names": [contract.S2_BANDS[i] for i in bands]},
        "dtype": str(run_config.dtype),
        "trained_with_sar": bool(run_config.flow.use_sar) and has_sar(model),
        "sampling": {
            "steps": int(run_config.flow.sample_steps),
            "guidance_scale": float(run_config.flow.guidance_scale),
            "source": str(flow.get("source", "noise")),
            "source_sigma": float(flow.get("source_sigma", 0.0)),
            "shift_schedule": bool(flow.get("shift_schedule", True)),
        },
        "tiling": {"tile_size": tile, "overlap": max(tile // 8, 8)},
        "dataset": str(run_config.data.get("dataset", "sen12mscr")),
        "cloud_score": _cloud_score(run_config),
        "weights": weights,
    }


def abstract_network(cfg: dict[str, Any], name: str, dtype: str | None = None):
    """The module `name` of a bundle config with abstract (shape-only) state, built without initialising."""
    import ml_collections
    from flax import nnx

    from crrf_jax.models import build

    model_cfg = ml_collections.ConfigDict(cfg["model"])
    dtype = dtype or cfg["dtype"]
    if name == "flow":
        return nnx.eval_shape(lambda: build.cloud_removal_flux(model_cfg, dtype))
    if name == "refiner":
        return nnx.eval_shape(lambda: build.refiner(model_cfg, dtype))
    return nnx.eval_shape(lambda: build.autoencoder(model_cfg, name, dtype))


def _plain(x):
    """JSON-ready copy: tuples become lists, NumPy scalars Python numbers."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ------------------------------------------------------------------------------------------------------------
# Flat states
# ------------------------------------------------------------------------------------------------------------


def flatten_state(state) -> dict[str, np.ndarray]:
    """An NNX state -> {"a/b/0/c": host array}."""
    from flax import nnx

    return {"/".join(map(str, path)): np.asarray(v) for path, v in _walk(nnx.to_pure_dict(state))}


def fill_state(abstract_model, flat: dict[str, np.ndarray], source: str):
    """`abstract_model` (from `abstract_network`) with every state leaf taken from `flat`.

    Raises BundleError naming `source` when keys are missing or unexpected, or a shape or dtype differs.
    """
    from flax import nnx

    graphdef, state = nnx.split(abstract_model)
    pure = nnx.to_pure_dict(state)
    expected = {"/".join(map(str, path)): (path, v) for path, v in _walk(pure)}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{source}: weights do not match the model config: missing {_few(missing)}, unexpected "
            f"{_few(unexpected)}"
        )
    for key, (path, abstract) in expected.items():
        value = np.asarray(flat[key])
        if abstract.shape == () and value.shape == (1,):  # safetensors stores scalars as (1,)
            value = value.reshape(())
        if tuple(value.shape) != tuple(abstract.shape):
            raise BundleError(f"{source}: {key} has shape {value.shape}, the model expects {abstract.shape}")
        _set(pure, path, np.asarray(value, dtype=abstract.dtype))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _walk(tree, prefix=()) -> Iterator[tuple[tuple, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _few(keys: Sequence[str], n: int = 5) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ------------------------------------------------------------------------------------------------------------
# Writing and reading a bundle
# ------------------------------------------------------------------------------------------------------------


def write_bundle(parts: ModelParts, out: str | os.PathLike, *, overwrite: bool = False) -> epath.Path:
    """Writes `parts` as a bundle directory; returns `out`.

    Locally the files go into `<out>.partial`, renamed to `out` when complete. An object store (gs://) has no
    directory rename: the files are written into `out` directly, config.json last (a bundle without it is
    reported incomplete by `read_bundle`).
    """
    from safetensors.numpy import save

    out = paths.as_path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    remote = paths.is_url(out)
    tmp = out if remote else out.with_name(out.name + ".partial")
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir(parents=True, exist_ok=True)
    flow = parts.states["flow"]
    files = {
        **{name: parts.states[name] for name in networks(parts.config) if name.startswith("vae")},
        "transformer": {k: v for k, v in flow.items() if not k.startswith(CLOUD_CNN_PREFIX)},
        "cloud_cnn": {k: v for k, v in flow.items() if k.startswith(CLOUD_CNN_PREFIX)},
    }
    if "refiner" in parts.states:
        files["refiner"] = parts.states["refiner"]
    for name, tensors in files.items():
        tensors = {k: np.ascontiguousarray(_storable(v)) for k, v in tensors.items()}
        paths.write_bytes(tmp / WEIGHT_FILES[name], save(tensors, metadata={"format": FORMAT, "network": name}))
    paths.write_text(tmp / LATENT_STATS_FILE, json.dumps(parts.latent_stats, indent=2) + "\n")
    paths.write_text(tmp / "README.txt", _readme(parts.config))
    config = dict(parts.config, exported=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    paths.write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    if not remote:
        if out.exists():
            out.rmtree()
        os.replace(tmp, out)
    return out


def read_bundle(path: str | os.PathLike) -> ModelParts:
    """The contents of a bundle directory; BundleError naming the file when one is missing or wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = paths.as_path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory does not exist")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise BundleError(f"{cfg_path}: bundle config missing (not a bundle written by crrf_jax.export?)")
    cfg = read_json(cfg_path)
    if cfg.get("format") != FORMAT:
        raise BundleError(f"{cfg_path}: not a {FORMAT} config (format={cfg.get('format')!r})")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(
            f"{cfg_path}: bundle format {cfg['format_version']} is newer than this crrf_jax "
            f"({FORMAT_VERSION})"
        )
    for key in ("model", "bands", "dtype", "sampling", "tiling"):
        if key not in cfg:
            raise BundleError(f"{cfg_path}: key {key!r} missing")
    tensors = {}
    for name, filename in cfg.get("weights", WEIGHT_FILES).items():
        file = path / filename
        if not file.is_file():
            raise BundleError(f"{file}: weights of {name} missing; the bundle is incomplete")
        try:
            tensors[name] = load(file.read_bytes())
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{file}: unreadable safetensors file ({e})") from e
    vaes = [name for name in networks(cfg) if name.startswith("vae")]
    for name in (*vaes, "transformer", "cloud_cnn"):
        if name not in tensors:
            raise BundleError(f"{cfg_path}: 'weights' lists no {name} file")
    states = {name: tensors[name] for name in vaes} | {"flow": {**tensors["transformer"], **tensors["cloud_cnn"]}}
    if has_refiner(cfg["model"]):
        if "refiner" not in tensors:
            raise BundleError(f"{cfg_path}: the model has a refiner but 'weights' lists no refiner file")
        states["refiner"] = tensors["refiner"]
    stats = read_latent_stats(path / LATENT_STATS_FILE, vaes)
    return ModelParts(cfg, states, stats, str(path))


def _storable(x: np.ndarray) -> np.ndarray:
    """safetensors.numpy stores standard NumPy dtypes: other floats (bfloat16) go to float32."""
    x = np.asarray(x)
    if x.dtype.kind == "V" or (x.dtype.kind == "f" and x.dtype not in (np.float16, np.float32, np.float64)):
        return x.astype(np.float32)
    return x


def _readme(cfg: dict[str, Any]) -> str:
    model = cfg["model"]
    return f"""crrf-jax inference bundle (format {FORMAT} v{FORMAT_VERSION})

Cloud removal for Sentinel-2 with a rectified-flow transformer in VAE latent space.
Model variant: {model.get('variant', '?')}; Sentinel-2 bands: {', '.join(cfg['bands']['names'])};
compute dtype: {cfg['dtype']}; trained with SAR: {cfg['trained_with_sar']}.
Sampling defaults: {cfg['sampling']['steps']} Euler steps, guidance scale {cfg['sampling']['guidance_scale']}.
Tiling defaults: {cfg['tiling']['tile_size']}-pixel tiles, {cfg['tiling']['overlap']}-pixel overlap.

Files
  config.json              model sizes, bands, dtype, sampling and tiling defaults
  vae_s2.safetensors       Sentinel-2 autoencoder (EMA weights)
  vae_s1.safetensors       Sentinel-1 autoencoder (EMA weights)
  transformer.safetensors  rectified-flow transformer (EMA weights)
  cloud_cnn.safetensors    cloud-probability encoder (EMA weights)
  refiner.safetensors      pixel-space refiner (EMA weights; only when the model has one)
  latent_stats.json        latent scale/shift of each autoencoder

Use
  python -m crrf_jax.predict --bundle=THIS_DIR --s2=cloudy.tif [--s1=sar.tif] --out=clear.tif

  from crrf_jax.inference import CloudRemover
  remover = CloudRemover.from_bundle("THIS_DIR")
  clear, std = remover.remove_clouds(s2_cloudy, s1)   # HxWxC reflectance in [0, 1], HxWx2 SAR in [0, 1]

Inputs: Sentinel-2 L1C (13 bands, SEN12MS-CR order, DN / 10000), Sentinel-1 VV/VH in dB (clipped to
[-25, 0] and mapped to [0, 1]); without SAR the model runs in its degraded SAR-absent mode.
"""


# ------------------------------------------------------------------------------------------------------------
# JSON files
# ------------------------------------------------------------------------------------------------------------


def read_latent_stats(path: str | os.PathLike, names=("vae_s2", "vae_s1")) -> dict[str, dict[str, float]]:
    """A latent_stats.json (a bundle's or a run's) -> "vae_s2"/"vae_s1" -> {"scale_factor", "shift_factor"}.

    Raises BundleError naming the file when it is missing or its statistics are unusable.
    """
    path = paths.as_path(path)
    if not path.is_file():
        raise BundleError(f"{path}: latent statistics missing; run the latent_stats stage first")
    raw = read_json(path)
    out = {}
    for name in names:
        try:
            out[name] = {k: float(raw[name][k]) for k in ("scale_factor", "shift_factor")}
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{path}: no {name}.scale_factor / shift_factor ({e!r})") from e
        if out[name]["scale_factor"] == 0 or not all(np.isfinite(list(out[name].values()))):
            raise BundleError(f"{path}: unusable {name} statistics {out[name]}")
    return out


def read_json(path: epath.Path) -> dict[str, Any]:
    """The JSON object in `path`; BundleError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable JSON ({e})") from e
