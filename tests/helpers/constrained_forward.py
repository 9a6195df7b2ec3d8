"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.

On a (data=2, fsdp=2, tensor=2) mesh, prints a JSON report of two comparisons, each as the largest absolute
difference per batch row and the values' scale:

- "flux": the tiny Flux transformer (its parameters in their train-state shardings, the inputs batch-sharded)
  run under `parallel.activations_on` (the blocks' weights gathered over 'fsdp', their outputs pinned to the
  batch layout) against the same jitted forward without the mesh context (no constraints at all).
- "xla": the partitioner miscompile that `parallel.gather_fsdp` avoids, in plain JAX: a scanned gated matmul
  block whose carry is pinned to the batch over ('data', 'fsdp'), against float64 NumPy.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from crrf_jax import parallel
from crrf_jax.models import flux


def rows(a, b) -> dict:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"row_max_diff": diff.reshape(diff.shape[0], -1).max(axis=1).tolist(), "scale": float(np.abs(b).max())}


def flux_forward(mesh) -> dict:
    cfg = flux.FluxConfig.from_dict(common.flux_config("tiny"))
    graphdef, params = nnx.split(flux.Flux(cfg, rngs=nnx.Rngs(0)))
    shardings = parallel.state_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    r = np.random.default_rng(0)
    b, n, m = 8, 16, 16
    ids = np.broadcast_to(r.integers(0, 4, (1, n + m, 3)), (b, n + m, 3)).astype(np.float32)
    x = {"img": r.normal(size=(b, n, cfg.in_channels)), "img_ids": ids[:, m:],
         "txt": r.normal(size=(b, m, cfg.context_in_dim)), "txt_ids": ids[:, :m],
         "t": r.uniform(size=(b,)), "y": r.normal(size=(b, cfg.vec_in_dim))}
    x = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
    x["key_mask"] = jnp.asarray(r.uniform(size=(b, n + m)) > 0.2)
    batch = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in x.items()}
    x = jax.device_put(x, batch)

    def forward(params, x):
        model = nnx.merge(graphdef, params)
        return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], key_mask=x["key_mask"])

    def on_mesh(params, x):
        with parallel.activations_on(mesh):
            return forward(params, x)

    free = jax.jit(forward, in_shardings=(shardings, batch))(params, x)
    pinned = jax.jit(on_mesh, in_shardings=(shardings, batch))(params, x)
    return rows(pinned, free)


def xla_miscompile(mesh) -> dict:
    """x = x + (vec @ wm) * (x @ w1 @ w2) for one scanned layer, the weights split over ('fsdp', 'tensor'),
    the carry's initial value an FSDP projection and its output pinned to the batch layout."""
    sharding = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    batch = sharding(("data", "fsdp"))
    r = np.random.default_rng(0)
    host = {"x": r.normal(size=(8, 2, 8)), "vec": r.normal(size=(8, 8)), "win": r.normal(size=(8, 8)),
            "wm": r.normal(size=(1, 8, 8)), "w1": r.normal(size=(1, 8, 16)), "w2": r.normal(size=(1, 16, 8))}
    specs = {"x": batch, "vec": batch, "win": sharding(None, "fsdp"), "wm": sharding(None, "fsdp", "tensor"),
             "w1": sharding(None, "fsdp", "tensor"), "w2": sharding(None, "tensor", "fsdp")}
    a = {k: jax.device_put(jnp.asarray(v, jnp.float32), specs[k]) for k, v in host.items()}

    def f(a):
        def body(x, w):
            x = x + (a["vec"] @ w["wm"])[:, None, :] * (x @ w["w1"] @ w["w2"])
            return jax.lax.with_sharding_constraint(x, batch), None

        return jax.lax.scan(body, a["x"] @ a["win"], {k: a[k] for k in ("wm", "w1", "w2")})[0]

    out = jax.jit(f, in_shardings=(specs,))(a)
    x = host["x"] @ host["win"]
    ref = x + (host["vec"] @ host["wm"][0])[:, None, :] * (x @ host["w1"][0] @ host["w2"][0])
    return rows(out, ref)


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    json.dump({"flux": flux_forward(mesh), "xla": xla_miscompile(mesh)}, sys.stdout)


if __name__ == "__main__":
    main()
