"""Device mesh, logical axis rules and shardings: the one place that maps model axes to devices.

Every parameter is created with logical axis names (`with_axes`). `LOGICAL_AXIS_RULES` maps each logical
name to a mesh axis of the ('data', 'fsdp', 'tensor') mesh. A rule whose mesh axis does not divide the
dimension falls back to replication for that dimension, so odd sizes (13 bands, 3 RoPE ids) never fail.

Several processes (jax.distributed, `initialize_distributed`) share one mesh; the helpers at the end move data
between host arrays and global arrays: `put_global` (each process places its devices' slices), `to_host`
(the whole value on every process), `gather_rows` (a batch's first rows from every process's part),
`allgather_float64` (host numbers, exactly), `is_writer` (process 0 writes files).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),  # the transformer's hidden size
    ("mlp", "tensor"),  # MLP hidden units
    ("heads", "tensor"),  # attention projections (heads x head_dim, fused qkv)
    ("in_features", None),  # small input projections (latent tokens, time embeddings)
    ("norm", None),  # norm scales and biases
    ("layers", None),  # the stacked (scanned) layer axis
    ("conv_in", None),  # convolution input channels
    ("conv_out", "fsdp"),  # convolution output channels
    ("kernel_h", None),
    ("kernel_w", None),
)


def with_axes(init, *names: str | None):
    """Wraps an initializer so its parameter carries logical axis `names` (one per dimension)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh. A size of -1 takes the remaining devices.

    `shape` is a mapping with some of the axis names, or a sequence of three sizes; missing axes get 1,
    and with nothing given all devices go to 'data'.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if shape is None:
        sizes = {"data": -1}
    elif isinstance(shape, dict) or hasattr(shape, "items"):
        sizes = dict(shape.items())
    else:
        sizes = dict(zip(MESH_AXES, shape, strict=True))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes must be among {MESH_AXES}, got {sorted(unknown)}")
    dims = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if dims.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = int(np.prod([d for d in dims if d != -1]))
    if -1 in dims:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into a mesh {sizes}")
        dims[dims.index(-1)] = n // known
    if int(np.prod(dims)) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, have {n}")
    # Auto axes: XLA's sharding propagation (GSPMD) places intermediates; we pin inputs and outputs.
    return jax.make_mesh(tuple(dims), MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules=LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`.

    A mesh axis is used at most once per array, and only where its size divides the dimension.
    """
    if not names:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = variable.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """A tree of NamedShardings for an NNX state (abstract or concrete), from each Variable's axis names."""

    def one(v):
        if isinstance(v, nnx.Variable):
            return v.replace(NamedSharding(mesh, logical_to_spec(_names(v), np.shape(v.get_value()), mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array: the leading axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` (B, ...) pinned to batch sharding (B over ('data', 'fsdp')) when traced under a mesh
    (`activations_on`); unchanged otherwise, or when the batch does not divide over those axes.

    Why: parameters are laid out `embed -> fsdp`, and without a constraint XLA's propagation may carry that
    layout into the activations, resharding (and replicating) them between blocks; pinning the blocks'
    activations to the batch's layout keeps each device's activations its own samples' (BENCHMARKS.md,
    "Memory at scale")."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *([None] * (x.ndim - 1))))


def gather_fsdp(state: Any, rules=LOGICAL_AXIS_RULES) -> Any:
    """`state` (an nnx.State: one scanned layer's parameters) with every Variable gathered over 'fsdp', i.e.
    pinned first to its own sharding and then to that sharding without 'fsdp': FSDP's just-in-time all-gather,
    made explicit. A no-op outside a mesh (`activations_on`) or where 'fsdp' has size 1. A Variable whose axis
    names outnumber its dimensions (a stacked module's, its 'layers' axis sliced off by the scan) is named by
    its trailing names.

    Why: left `embed -> fsdp` inside the Flux scan, the weights leave the partitioner to choose at every matmul
    how to meet the batch-sharded activations, and with 'data', 'fsdp' and 'tensor' all > 1 it miscompiled the
    scanned MLP (jaxlib 0.10.2): it moved an intermediate to the batch over ('fsdp', 'data') by a
    collective-permute (devices 2 <-> 4, 3 <-> 5) and never moved it back, so those devices' samples were mixed
    (tests/helpers/constrained_forward.py has the plain-JAX repro). Gathered weights leave one layout per matmul:
    batch-sharded activations against weights split over 'tensor' only.

    In the backward pass the constraints run in reverse, so each layer's weight gradient is reduce-scattered
    back to the split layout inside the scan; models/flux.py `_scan` does not keep the gathered weights for the
    backward pass but gathers them again there, as FSDP does."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
        return state
    gathered_rules = []
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        gathered_rules.append((name, tuple(a for a in axes if a != "fsdp") or None))

    def one(variable):
        if not isinstance(variable, nnx.Variable):
            return variable
        value, names = variable.get_value(), _names(variable)
        if not names or len(names) < np.ndim(value):
            return variable
        names, shape = tuple(names)[len(names) - np.ndim(value) :], np.shape(value)
        split = jax.lax.with_sharding_constraint(value, logical_to_spec(names, shape, mesh, rules))
        whole = jax.lax.with_sharding_constraint(split, logical_to_spec(names, shape, mesh, tuple(gathered_rules)))
        return variable.replace(whole)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def activations_on(mesh: Mesh):
    """Context for tracing a function whose activations `constrain_batch` pins on `mesh` (usable inside
    jit: it sets the abstract mesh only)."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place_like(state: Any, values: dict[tuple, np.ndarray]) -> Any:
    """`state` (an nnx.State of jax.Arrays) with the leaves at the paths of `values` (as `nnx.to_flat_state`
    spells them) replaced by those host arrays, each built shard by shard in the sharding and dtype of the
    leaf it replaces (a process materialises only its own shards). Other leaves are kept as they are."""
    flat = list(nnx.to_flat_state(state))
    unknown = set(values) - {tuple(p) for p, _ in flat}
    if unknown:
        raise KeyError(f"no such parameters to place: {sorted(map(str, unknown))[:5]}")

    def one(path, variable):
        if path not in values:
            return variable
        old = variable.get_value()
        host = np.asarray(values[path], dtype=old.dtype)
        if host.shape != old.shape:
            raise ValueError(f"parameter {'/'.join(map(str, path))}: value of shape {host.shape}, expected {old.shape}")
        return variable.replace(jax.make_array_from_callback(old.shape, old.sharding, lambda index: host[index]))

    return nnx.from_flat_state([(tuple(p), one(tuple(p), v)) for p, v in flat])


# --------------------------------------------------------------------------------------------------------------
# Several processes (multi-host): every process runs the same computation on global arrays
# --------------------------------------------------------------------------------------------------------------


def initialize_distributed(enabled: bool = False) -> None:
    """jax.distributed.initialize() when `enabled` (config.distributed) or JAX_COORDINATOR_ADDRESS is set.

    The coordinator address, process count and process id come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID where set (GPU clusters, CPU tests); on TPU pods and SLURM JAX finds
    them itself. CPU processes talk through gloo collectives. train.py, eval.py and the predict CLI call it.
    """
    if not (enabled or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if os.environ.get(env):
            try:
                kwargs[key] = int(os.environ[env])
            except ValueError:
                raise ValueError(f"{env}={os.environ[env]!r} in the environment is not an integer") from None
    jax.distributed.initialize(os.environ.get("JAX_COORDINATOR_ADDRESS") or None, **kwargs)


def is_writer() -> bool:
    """Whether this process writes the files of a multi-process job (process 0; always with one process)."""
    return jax.process_index() == 0


def put_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds whole (the same values on every process):
    each process places only the slices of its own devices."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as a host array, on every process (a collective
    when the array spans other processes' devices: every process must call it)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of the global batch whose per-process parts are `local` (process 0's first, then
    process 1's, ...): the same host arrays on every process (a collective with several processes)."""
    first = {k: np.asarray(v)[:rows] for k, v in local.items()}
    if jax.process_count() == 1:
        return first
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(first, tiled=True)
    return {k: np.asarray(v)[:rows].astype(first[k].dtype) for k, v in gathered.items()}


def allgather_float64(values: Sequence[float]) -> np.ndarray:
    """Every process's `values` (k floats) -> (process count, k) float64, exactly (the doubles travel as pairs
    of uint32, so JAX's default 32-bit mode does not round them)."""
    mine = np.asarray(values, np.float64).reshape(1, -1)
    if jax.process_count() == 1:
        return mine
    from jax.experimental import multihost_utils

    words = multihost_utils.process_allgather(mine.view(np.uint32), tiled=True)
    return np.ascontiguousarray(np.asarray(words, np.uint32)).view(np.float64)
