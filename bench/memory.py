"""Memory at scale: per-device bytes of the flow train step for base, large and flux sizes on 8 devices.

    python bench/memory.py [--variants base,large,flux] [--meshes data,fsdp,fsdp_tensor] [--devices 8]
                           [--size 256] [--batch 8] [--dtype auto] [--remat none]
                           [--remat-compare largest|VARIANT|none] [--depth-override 0] [--write]

Nothing is materialised: the train state (parameters, AdamW moments, EMA, counters) is built with
`jax.eval_shape` of its initialisation, given the shardings `train_lib.train_state_shardings` assigns on each
mesh, and the jitted flow step (`train_lib.compile_step` of `train_lib.train_step` with `train_lib.flow_loss`,
as train.py runs it, on cached latents as in bench/train_step.py) is lowered and compiled on abstract inputs
(jax.ShapeDtypeStruct with shardings). So FLUX.1-dev sizes (12 B parameters, ~190 GB of float32 state) cost
only compile time and compiler memory.

Reported per device:
- params / opt state / EMA: sum over leaves of (shard shape x itemsize) in the assigned shardings, beside the
  ideal 1/N of the total (N = devices): the gap is what stays replicated (norms, biases, odd sizes, and on the
  data mesh everything).
- XLA's memory analysis of the compiled step (`compiled.memory_analysis()`, per device, SPMD-partitioned):
  arguments (state + batch), outputs, aliased (donated state reused for the output), temporaries (activations
  saved for the backward pass, gradients, optimizer intermediates, collectives' buffers) and generated code.
  Peak estimate = arguments + outputs - aliased + temporaries.

The mesh names: data (data=N, every device a full replica), fsdp (fsdp=N), fsdp_tensor (fsdp=N/2, tensor=2).
Remat policies (`config.remat_policy`, crrf_jax/models/flux.py REMAT_POLICIES) are compared on the fsdp mesh
for the largest variant asked for (--remat-compare): the temporaries are where they differ.

--depth-override K compiles K double + 2K single blocks and 2K double + 4K single blocks (every variant has
twice as many single as double blocks) instead of the full depth and extrapolates the compiled figures linearly
to the full depth; the state bytes are always exact (the full-depth state is cheap to build abstractly). Use
it where the full-depth compile is too slow or too large for the machine; rows so obtained are marked
"estimate". (Checked once: base on the data mesh, K = 1, estimated 2.37 GiB of temporaries against 2.31 GiB
compiled at full depth. Every default configuration, flux included, compiled at full depth in about a minute
on 2 CPU cores, the blocks being one scanned body each.)

The devices are simulated on the host CPU: the script re-runs itself in a child with
XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu unless jax already sees N devices
of one kind in this process (set both yourself to skip the child). The figures are the compiler's for the
CPU backend; a GPU/TPU compile fuses and schedules differently, so treat them as the layout's, not a
device's, measurements. `--write` puts the results into the "Memory at scale" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import report  # bench/report.py, beside this script

CHILD_ENV = "CRRF_MEMORY_BENCH_CHILD"
MESHES = {  # name -> axis sizes; -1 takes the remaining devices
    "data": {"data": -1},
    "fsdp": {"fsdp": -1},
    "fsdp_tensor": {"fsdp": -1, "tensor": 2},
}
REMAT_COMPARED = ("none", "full", "dots_saveable", "nothing_saveable")
GIB = 2**30


@dataclasses.dataclass
class Row:
    variant: str
    mesh: str
    remat: str
    dtype: str
    totals: dict  # unsharded bytes: params, opt_state, ema, total
    state: dict  # per-device bytes: params, opt_state, ema, total
    compiled: dict | None = None  # per-device bytes from XLA's memory analysis
    compile_s: float = 0.0
    estimate: bool = False
    error: str = ""


# --------------------------------------------------------------------------------------------------------------
# Building and compiling abstractly
# --------------------------------------------------------------------------------------------------------------


def step_parts(variant: str, dtype: str, remat: str, depth: int | None):
    """(model_fn, tx, step_fn) of the flow stage of `variant`; `depth` K overrides the blocks (K double, 2K
    single)."""
    from configs import common
    from crrf_jax import train_lib
    from crrf_jax.models import build

    config = common.base_config(variant)
    if depth is not None:
        config.model.flux.depth, config.model.flux.depth_single_blocks = depth, 2 * depth
    scfg = config.flow
    tx = train_lib.make_optimizer(scfg)
    model_fn = functools.partial(build.cloud_removal_flux, config.model, dtype, remat, 0)
    loss_fn = functools.partial(train_lib.flow_loss, cfg=train_lib.FlowLossConfig.from_config(scfg))
    step_fn = functools.partial(train_lib.train_step, loss_fn=loss_fn, tx=tx,
                                cfg=train_lib.StepConfig.from_config(scfg))
    return model_fn, tx, step_fn


def abstract_state(model_fn, tx, mesh):
    """(abstract TrainState whose leaves carry their shardings, the shardings)."""
    import jax

    from crrf_jax import train_lib

    shapes = jax.eval_shape(lambda: train_lib.create_train_state(model_fn(), tx))
    shardings = train_lib.train_state_shardings(shapes, tx, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return state, shardings


def abstract_batch(mesh, batch: int, size: int) -> dict:
    """Cached-latent flow batch (bench/train_step.py `latent_batch`) as sharded ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    from configs import common
    from crrf_jax import parallel

    lat = (batch, size // 8, size // 8, common.Z_CHANNELS)
    shapes = {"x0": lat, "cloudy": lat, "sar": lat, "cloud_prob": (batch, size, size, 1)}
    return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=parallel.batch_sharding(mesh, len(s)))
            for k, s in shapes.items()}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the sharded abstract arrays in `tree` (the largest shard of each leaf)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize
    return total


def total_bytes(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compiled_memory(mesh, step_fn, state, shardings, batch) -> tuple[dict, float]:
    """(XLA's per-device memory analysis of the compiled step, compile seconds)."""
    import jax

    from crrf_jax import train_lib

    bsh = {k: v.sharding for k, v in batch.items()}
    t0 = time.perf_counter()
    lowered = train_lib.compile_step(step_fn, shardings, bsh, None, mesh).lower(
        state, batch, jax.random.key(0), None)
    mem = lowered.compile().memory_analysis()
    seconds = time.perf_counter() - t0
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): int(getattr(mem, f)) for f in fields}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out, seconds


def measure(variant: str, mesh_name: str, args, remat: str) -> Row:
    """One row: exact state bytes at full depth, compiled figures at full depth or extrapolated."""
    from configs import common
    from crrf_jax import parallel

    mesh = parallel.make_mesh(MESHES[mesh_name])
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if variant in ("large", "flux") else "float32")
    model_fn, tx, step_fn = step_parts(variant, dtype, remat, None)
    state, shardings = abstract_state(model_fn, tx, mesh)
    parts = {"params": state.params, "opt_state": state.opt_state, "ema": state.ema}
    parts["total"] = state
    per_dev = {k: per_device_bytes(v) for k, v in parts.items()}
    row = Row(variant, mesh_name, remat, dtype, {k: total_bytes(v) for k, v in parts.items()}, per_dev)
    batch = abstract_batch(mesh, args.batch, args.size)
    try:
        k = args.depth_override
        if not k:
            row.compiled, row.compile_s = compiled_memory(mesh, step_fn, state, shardings, batch)
            return row
        full = common.flux_config(variant).depth
        points = []
        for depth in (k, 2 * k):
            model_k, _, step_k = step_parts(variant, dtype, remat, depth)
            state_k, sh_k = abstract_state(model_k, tx, mesh)
            mem, seconds = compiled_memory(mesh, step_k, state_k, sh_k, batch)
            points.append(mem)
            row.compile_s += seconds
        row.compiled = {f: int(points[0][f] + (points[1][f] - points[0][f]) * (full - k) / k) for f in points[0]}
        row.estimate = True
    except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def gib(n: int | None) -> str:
    """Bytes as GiB (MiB below 1 GiB, so the small variants still show)."""
    if n is None:
        return "n/a"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def print_row(r: Row, devices: int) -> None:
    s = r.state
    head = f"{r.variant} {r.mesh} remat={r.remat} {r.dtype}: state/device {gib(s['total'])} " \
           f"(params {gib(s['params'])}, ideal {gib(r.totals['params'] // devices)})"
    if r.error:
        print(f"{head}; did not compile: {r.error}", flush=True)
        return
    c = r.compiled
    print(f"{head}; XLA args {gib(c['argument'])} out {gib(c['output'])} alias {gib(c['alias'])} "
          f"temp {gib(c['temp'])} peak {gib(c['peak'])}; compile {r.compile_s:.1f} s"
          f"{' (estimate)' if r.estimate else ''}", flush=True)


def table(rows: list[Row], devices: int) -> list[str]:
    lines = [
        ("| variant | mesh | dtype | params (total) | params / device (ideal 1/N) | opt state / device (ideal) | "
         "EMA / device | XLA arguments | XLA temp | XLA aliased | peak est. | compile (s) |"),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s, t = r.state, r.totals
        cells = [r.variant, r.mesh.replace("_", " x "), r.dtype, gib(t["params"]),
                 f"{gib(s['params'])} ({gib(t['params'] // devices)})",
                 f"{gib(s['opt_state'])} ({gib(t['opt_state'] // devices)})", gib(s["ema"])]
        if r.error:
            cells += ["did not compile: " + r.error.replace("|", "/"), "", "", "", ""]
        else:
            c, mark = r.compiled, " (est.)" if r.estimate else ""
            cells += [gib(c["argument"]), gib(c["temp"]) + mark, gib(c["alias"]), gib(c["peak"]) + mark,
                      f"{r.compile_s:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def remat_table(rows: list[Row]) -> list[str]:
    lines = ["| remat policy | XLA temp / device | peak est. / device | compile (s) |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.remat} | did not compile: {r.error.replace('|', '/')} | | |")
        else:
            mark = " (est.)" if r.estimate else ""
            lines.append(f"| {r.remat} | {gib(r.compiled['temp'])}{mark} | {gib(r.compiled['peak'])}{mark} | "
                         f"{r.compile_s:.0f} |")
    return lines


def fsdp_note(rows: list[Row]) -> list[str]:
    """What the fsdp rows' temporaries say beside the data rows' (same per-device batch)."""
    temp = {(r.variant, r.mesh): r.compiled["temp"] for r in rows if r.compiled}
    ratios = [f"{v} {temp[v, m] / temp[v, 'data']:.1f}x" for v, m in temp if m == "fsdp" and (v, "data") in temp]
    if not ratios:
        return []
    grew = any(temp[v, m] > 1.2 * temp[v, "data"] for v, m in temp if m == "fsdp" and (v, "data") in temp)
    why = (" The temporaries grow beyond data parallelism's: XLA's propagation (GSPMD) carries the parameters' "
           "`embed -> fsdp` layout into the activations (look for 'involuntary full rematerialization')."
           if grew else
           " FSDP's temporaries stay at data parallelism's or below while the state shrinks to about 1/N.")
    return ["", "FSDP temporaries against data parallelism at the same per-device batch (fsdp / data): "
            + ", ".join(ratios) + "." + why]


def section(rows: list[Row], remat_rows: list[Row], args, wall_s: float) -> str:
    import jax

    command = "python bench/memory.py " + " ".join(a for a in sys.argv[1:])
    lines = [
        "## Memory at scale",
        "",
        f"`{command.strip()}` ({datetime.date.today().isoformat()}; {wall_s / 60:.1f} min)",
        "",
        (f"Machine: {report.machine()}; {jax.device_count()} devices simulated on the host "
         "(XLA_FLAGS=--xla_force_host_platform_device_count), figures from the CPU compiler."),
        (f"Flow train step (`train_lib.train_step` + `flow_loss` on cached latents: transformer forward and "
         f"backward, gradient clipping, AdamW, EMA) at global batch {args.batch} of {args.size}x{args.size} "
         f"patches ({args.size // 8}x{args.size // 8} latents, {3 * (args.size // 16) ** 2} tokens), built and compiled abstractly (no "
         "weights materialised). Bytes per device. State bytes are exact (shard shapes x itemsize in the "
         "assigned shardings); parameters, moments and EMA are float32 whatever the compute dtype; ideal = "
         "total / N. XLA's columns come from `compiled.memory_analysis()`: arguments = state + batch, temp = "
         "activations kept for the backward pass + gradients + intermediates, aliased = donated state reused "
         "for the new state; peak est. = arguments + outputs - aliased + temp."),
        "",
        *table(rows, jax.device_count()),
        *fsdp_note(rows),
    ]
    if remat_rows:
        r0 = remat_rows[0]
        lines += ["", f"Remat policies, {r0.variant} on the {r0.mesh.replace('_', ' x ')} mesh ({r0.dtype}):", "",
                  *remat_table(remat_rows)]
    if any(r.estimate for r in rows + remat_rows):
        k = args.depth_override
        lines += ["", (f"(est.): an estimate, compiled at {k} and {2 * k} double blocks (twice as many single) "
                       "and extrapolated linearly to the full depth (--depth-override).")]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Entry
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="base,large,flux", help="comma-separated model variants")
    p.add_argument("--meshes", default="data,fsdp,fsdp_tensor", help=f"comma-separated, of {list(MESHES)}")
    p.add_argument("--devices", type=int, default=8, help="simulated devices")
    p.add_argument("--size", type=int, default=256, help="patch size in pixels (latent = size / 8)")
    p.add_argument("--batch", type=int, default=8, help="global batch (default: one per device)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bfloat16 for large/flux) | float32 | bfloat16")
    p.add_argument("--remat", default="none", help="remat policy of the main table")
    p.add_argument("--remat-compare", default="largest",
                   help="variant whose remat policies are compared (largest compiled of --variants but tiny; none: skip)")
    p.add_argument("--depth-override", type=int, default=0,
                   help="compile K and 2K double blocks (2K, 4K single) and extrapolate (an estimate)")
    p.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = p.parse_args(argv)
    for m in args.meshes.split(","):
        if m not in MESHES:
            p.error(f"--meshes: unknown mesh {m!r}; choose among {list(MESHES)}")
    return args


def run_child(args) -> int:
    """Re-runs this script with N simulated CPU devices; returns its exit status."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, JAX_PLATFORMS="cpu", CRRF_MEMORY_BENCH_CHILD="1",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={args.devices}".strip())
    return subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env, check=False).returncode


def main() -> None:
    args = parse_args()
    if not os.environ.get(CHILD_ENV) and f"device_count={args.devices}" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit(run_child(args))
    import jax

    if jax.device_count() != args.devices:
        sys.exit(f"bench/memory.py: jax sees {jax.device_count()} devices, --devices is {args.devices}; set "
                 f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} (or let the script do it)")
    t0 = time.perf_counter()
    variants = args.variants.split(",")
    rows = []
    for variant in variants:
        for mesh_name in args.meshes.split(","):
            rows.append(measure(variant, mesh_name, args, args.remat))
            print_row(rows[-1], args.devices)
            publish(rows, [], args, t0, final=False)  # a cut-short run keeps what it measured
    remat_rows = []
    target = variants[-1] if args.remat_compare == "largest" else args.remat_compare
    if target != "none":
        ok = [r.variant for r in rows if not r.error]
        if args.remat_compare == "largest":
            target = ok[-1] if ok and ok[-1] != "tiny" else "none"  # tiny is too small to tell policies apart
    for policy in REMAT_COMPARED if target != "none" else ():
        done = [r for r in rows if (r.variant, r.mesh, r.remat) == (target, "fsdp", policy)]
        remat_rows.append(done[0] if done else measure(target, "fsdp", args, policy))
        print_row(remat_rows[-1], args.devices)
        publish(rows, remat_rows, args, t0, final=False)
    publish(rows, remat_rows, args, t0, final=True)


def publish(rows, remat_rows, args, t0: float, final: bool) -> None:
    """Prints the section when `final`; with --write writes it every time (after every row)."""
    text = section(rows, remat_rows, args, time.perf_counter() - t0)
    if final:
        print(text)
    if args.write:
        report.write_section("Memory at scale", text)


if __name__ == "__main__":
    main()
