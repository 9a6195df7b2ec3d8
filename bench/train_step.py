"""Flow training step: step time, samples/s and MFU of our JAX step and of diffusers' FLUX in PyTorch.

    python bench/train_step.py [--variants tiny,base] [--size 256] [--batch 0] [--steps 3] [--dtype auto]
                               [--remat none] [--sides jax,torch] [--no-torch] [--feed-steps 0]
                               [--feed-workers 0] [--profile] [--peak-tflops 0] [--section "Train step"]
                               [--write] [--json FILE]

The step is the rectified-flow training step of the transformer on latents (no VAE): a 256x256 patch is a
32x32 latent, i.e. 256 noisy-target tokens + 256 cloudy tokens in the image stream and 256 SAR tokens in the
context stream (768 tokens). Both sides do the same work: interpolate x_t, run the transformer forward and
backward, clip the gradient norm to 1, one AdamW update and one EMA update.

- jax: `train_lib.train_step` with `train_lib.flow_loss` on cached latents, exactly as train.py runs it (jit,
  explicit shardings over a ('data',) mesh of every device, donated state); it also runs the small
  cloud-probability CNN and the token assembly of CloudRemovalFlux.
- torch: `diffusers.FluxTransformer2DModel` of the same sizes (in/out channels, hidden size, heads, double and
  single blocks, RoPE axes), a random pooled vector in place of the CNN; eager mode, attention through
  PyTorch's scaled_dot_product_attention; float32 on CPU, bfloat16 autocast (float32 weights) on GPU.
- torch_compile (`--sides jax,torch,torch_compile`): the same model wrapped in `torch.compile` (default mode);
  its compile happens in two warm-up steps, counted in setup. bench/gpu.sh runs it in its own process under a
  timeout, since a compile can outlast a benchmark's time.

--profile traces one JAX step after the timed ones (`profile_jax`): its time by XLA op kind, and the page
faults and system CPU time of a step, which is where the CPU step's time beyond its matmuls goes.

--feed-steps N adds the feed test: N JAX steps fed from the flow stage's own grain pipeline
(`latent_cache.iterator` over a synthetic latent cache written in its format, --feed-workers processes) the way
train.py's loop feeds them (host batch -> global array -> step, dispatch asynchronous), against N steps on one
device-resident batch: if the fed steps are slower, the step waits for data.

FLOPs are counted analytically for the transformer only (`train_lib.flux_train_flops`): every matmul of the
forward pass (2 FLOPs per multiply-add) over its tokens, plus attention 4 * L^2 * hidden per block (QK^T and
AV over the joint sequence L), and the training step as 3x the forward (the backward pass costs two forwards).
In the usual shorthand: 6 * (matmul parameters x their tokens) + 12 * L^2 * hidden per block. XLA's own count
of the compiled JAX step (cost analysis) is printed next to it: it counts the scanned blocks' body once, so it
falls short by about the number of blocks.
MFU = analytic FLOPs / step time / peak. Peak: the dense bf16 figure of the GPU/TPU kind
(`crrf_jax.trainer.PEAK_TFLOPS`, with its sources: H100/H200 SXM 989, H100 PCIe 756, NVL 835 TFLOP/s); on CPU
an upper bound from the widest vector unit /proc/cpuinfo lists (cores x clock x 2 FMA pipes x lanes x 2), or
--peak-tflops.

`large` (1.25 B matmul parameters: about 25 GB of float32 weights, gradients, Adam moments and EMA) and `flux`
need an accelerator (`--variants large` on one 80 GB GPU; `flux` needs FSDP, which this script does not set up).
--batch 0 picks 1 sample per device on CPU and 16 on an accelerator; --dtype auto is float32 on CPU and
bfloat16 on GPU/TPU. Runs unchanged on CPU, GPU and TPU (torch on CPU or CUDA). `--write` puts the results
into the --section section of BENCHMARKS.md (or of $CRRF_BENCHMARKS).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import jax
import report  # bench/report.py, beside this script

from configs import common
from crrf_jax import parallel, train_lib
from crrf_jax.models import build
from crrf_jax.models.flux import FluxConfig
from crrf_jax.trainer import PEAK_TFLOPS  # dense bf16 peak per device kind, as training's MFU

# FP32 lanes of the widest vector unit the CPU reports (/proc/cpuinfo flags); two FMA pipes per core (every
# x86 core with AVX2 or AVX-512 since Haswell / Skylake-SP has two; a few AVX-512 parts fuse them into one,
# so the peak is an upper bound and MFU a lower bound), 2 FLOP per FMA.
VECTOR_LANES = (("avx512f", 16), ("avx2", 8), ("avx", 8), ("sse2", 4))
FMA_PIPES = 2


# --------------------------------------------------------------------------------------------------------------
# Analytic FLOPs
# --------------------------------------------------------------------------------------------------------------


def matmul_params(cfg: FluxConfig) -> int:
    """Parameters of the transformer's matmuls (weights only), for the 6 * params * tokens shorthand."""
    h, m = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    double = 2 * (3 * h * h + h * h + 2 * h * m + 6 * h * h)
    single = h * (3 * h + m) + (h + m) * h + 3 * h * h
    return cfg.depth * double + cfg.depth_single_blocks * single


def peak_tflops(backend: str, override: float) -> tuple[float, str]:
    """(peak TFLOP/s of the whole machine, how it was found)."""
    if override:
        return override * (jax.device_count() if backend != "cpu" else 1), "given"
    if backend != "cpu":
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), 0.0)
        return peak * jax.device_count(), f"dense bf16 of {kind}" if peak else f"unknown for {kind}"
    mhz, (flag, lanes) = _cpu_mhz(), _vector_lanes()
    if not mhz or not lanes:
        return 0.0, "unknown CPU clock or vector width: no MFU"
    cores = os.cpu_count() or 1
    per_cycle = FMA_PIPES * lanes * 2
    peak = cores * mhz * 1e6 * per_cycle / 1e12
    return peak, (f"upper bound: {cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FP32 FLOP/cycle "
                  f"({flag}: {lanes} lanes, {FMA_PIPES} FMA pipes)")


def _vector_lanes() -> tuple[str, int]:
    """(the widest vector extension /proc/cpuinfo lists, its FP32 lanes), or ("", 0) when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return "", 0
    return next(((flag, lanes) for flag, lanes in VECTOR_LANES if flag in flags), ("", 0))


def _cpu_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            return max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        return 0.0


# --------------------------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------------------------


def latent_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Cached-latent flow batch: x0, cloudy, sar (B, size/8, size/8, 16) and cloud_prob (B, size, size, 1)."""
    rng = np.random.default_rng(seed)
    lat = (batch, size // 8, size // 8, common.Z_CHANNELS)
    return {
        "x0": rng.standard_normal(lat, np.float32),
        "cloudy": rng.standard_normal(lat, np.float32),
        "sar": rng.standard_normal(lat, np.float32),
        "cloud_prob": rng.uniform(0, 1, (batch, size, size, 1)).astype(np.float32),
    }


def time_steps(step, steps: int) -> tuple[float, float]:
    """(median, best) seconds of `steps` calls of step(i), each run to completion on its own."""
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _jax_step(variant: str, dtype: str, remat: str, host: dict[str, np.ndarray]):
    """(compiled step, state, batch shardings, init seconds, compile seconds) of the flow train step for
    batches shaped and typed like `host`, as train.py builds it."""
    config = common.base_config(variant)
    mesh = parallel.make_mesh({"data": -1})
    scfg = config.flow
    tx = train_lib.make_optimizer(scfg)
    model_fn = functools.partial(build.cloud_removal_flux, config.model, dtype, remat, 0)
    loss_cfg = train_lib.FlowLossConfig(scfg.t_sampling, scfg.sar_dropout, scfg.cloudy_dropout, True, 0.0)
    loss_fn = functools.partial(train_lib.flow_loss, cfg=loss_cfg)
    step_fn = functools.partial(train_lib.train_step, loss_fn=loss_fn, tx=tx,
                                cfg=train_lib.StepConfig.from_config(scfg))
    t0 = time.perf_counter()
    state = train_lib.init_train_state(model_fn, tx, mesh)
    shardings = train_lib.train_state_shardings(state, tx, mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    batch_shardings = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in host.items()}
    data = {k: jax.device_put(v, batch_shardings[k]) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = train_lib.compile_step(step_fn, shardings, batch_shardings, None, mesh).lower(
        state, data, jax.random.key(0), None
    ).compile()
    return compiled, state, batch_shardings, init_s, time.perf_counter() - t0


def bench_jax(variant: str, size: int, batch: int, steps: int, dtype: str, remat: str,
              profile: bool = False) -> dict:
    host = latent_batch(batch, size)
    t0 = time.perf_counter()
    compiled, state, batch_shardings, init_s, compile_s = _jax_step(variant, dtype, remat, host)
    data = {k: jax.device_put(v, batch_shardings[k]) for k, v in host.items()}
    rng = jax.random.key(0)
    state, metrics = compiled(state, data, rng, None)  # first run
    jax.block_until_ready(metrics)
    setup_s = time.perf_counter() - t0
    xla_flops = _xla_flops(compiled)

    holder = {"state": state}

    def one(i):
        holder["state"], out = compiled(holder["state"], data, jax.random.fold_in(rng, i + 1), None)
        jax.block_until_ready(out["loss"])

    median, best = time_steps(one, steps)
    prof = None
    if profile:
        try:
            prof = profile_jax(compiled, holder["state"], data, jax.random.fold_in(rng, 0))
        except Exception as e:  # noqa: BLE001 - a profiler that cannot start (e.g. no CUPTI) loses only this
            print(f"{variant}: --profile failed: {type(e).__name__}: {e}", flush=True)
    return {"median_s": median, "best_s": best, "setup_s": setup_s, "init_s": init_s, "compile_s": compile_s,
            "xla_flops": xla_flops, "profile": prof}


def profile_jax(compiled, state, data, rng) -> dict:
    """Where one JAX step's time goes: a jax.profiler trace of one step, its XLA thunks (CPU) or kernels
    summed by op kind (the HLO name up to its first '.': `ynn_fusion` = XLA CPU's matmul fusions,
    `wrapped_broadcast` = buffers filled with a constant, `dynamic-slice...` / `...dynamic-update-slice...` =
    the scanned blocks' per-layer weights and gradients, `copy...` = copies), and the wall time, minor page
    faults and user / system CPU seconds of the untraced step before it (getrusage)."""
    import collections
    import glob
    import gzip
    import json
    import resource
    import tempfile

    wrappers = ("ThunkExecutor::", "SlinkyThreadPool::", "PjitFunction(", "$")
    with tempfile.TemporaryDirectory() as tmp:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        state, out = compiled(state, data, rng, None)  # untraced: its faults and CPU time
        jax.block_until_ready(out)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        state, out = compiled(state, data, rng, None)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kinds = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(wrappers):
            kinds[e["name"].split(".")[0]] += e.get("dur", 0) / 1e6
    return {"kinds": kinds.most_common(), "wall_s": wall, "minflt": r1.ru_minflt - r0.ru_minflt,
            "sys_s": r1.ru_stime - r0.ru_stime, "user_s": r1.ru_utime - r0.ru_utime}


def write_latent_cache(directory: str, n: int, size: int, seed: int = 0) -> str:
    """A synthetic latent cache of `n` patches of `size` pixels in `latent_cache`'s format (random latents,
    a uint8 cloud map): what the flow stage reads, without encoding a dataset first."""
    from crrf_jax import latent_cache

    rng = np.random.default_rng(seed)
    lat = (n, size // 8, size // 8, common.Z_CHANNELS)
    os.makedirs(directory, exist_ok=True)
    for k in latent_cache.LATENT_KEYS:
        np.save(os.path.join(directory, f"{k}.npy"), rng.standard_normal(lat, np.float32))
    np.save(os.path.join(directory, "cloud_prob.npy"), rng.integers(0, 256, (n, size, size, 1), np.uint8))
    with open(os.path.join(directory, "ids.txt"), "w") as f:
        f.write("".join(f"p{i}\n" for i in range(n)))
    with open(os.path.join(directory, "DONE"), "w") as f:
        f.write(f"{n}\n")
    return directory


def bench_feed(variant: str, size: int, batch: int, steps: int, dtype: str, remat: str, workers: int) -> dict:
    """Is the step ever waiting for data? `steps` flow train steps fed from the flow stage's grain pipeline
    (`latent_cache.iterator` over a synthetic cache, `workers` processes; host batch -> global array -> step,
    as the trainer's loop does, dispatch asynchronous) against the same steps on one device-resident batch
    (run before and after the fed steps, the faster kept; after a warm-up run), and the pipeline alone."""
    import tempfile

    from absl import flags

    from crrf_jax import latent_cache

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (train.py parses them)
        flags.FLAGS.mark_as_parsed()
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_latent_cache(tmp, max(4 * batch, 32), size)
        it = latent_cache.iterator(cache, batch_size=batch, crop_size=size, seed=0, worker_count=workers)
        arrays = lambda b: {k: v for k, v in b.items() if isinstance(v, np.ndarray)}
        first = arrays(next(it))
        compiled, state, shardings, _, _ = _jax_step(variant, dtype, remat, first)
        put = lambda b: {k: jax.make_array_from_process_local_data(shardings[k], v)
                         for k, v in b.items()}
        resident, rng = put(first), jax.random.key(0)
        state, out = compiled(state, resident, rng, None)  # first run
        jax.block_until_ready(out)

        def run(feed) -> tuple[float, float]:
            nonlocal state
            host_s, t0 = 0.0, time.perf_counter()
            for i in range(steps):
                h0 = time.perf_counter()
                data = feed()
                host_s += time.perf_counter() - h0
                state, out = compiled(state, data, jax.random.fold_in(rng, i + 1), None)
            jax.block_until_ready(out["loss"])
            return (time.perf_counter() - t0) / steps, host_s / steps

        run(lambda: resident)  # warm-up: the first steps after the compile run are slower
        first_s, _ = run(lambda: resident)
        fed_s, host_s = run(lambda: put(arrays(next(it))))
        resident_s = min(first_s, run(lambda: resident)[0])  # before and after: the faster of the two
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        pipeline_s = (time.perf_counter() - t0) / steps
    return {"resident_s": resident_s, "fed_s": fed_s, "host_s": host_s, "pipeline_s": pipeline_s,
            "workers": workers, "steps": steps}


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001 - best effort
        return None


# --------------------------------------------------------------------------------------------------------------
# PyTorch (diffusers)
# --------------------------------------------------------------------------------------------------------------


def bench_torch(cfg: FluxConfig, size: int, batch: int, steps: int, on_gpu: bool, compile_: bool = False) -> dict:
    """diffusers' FluxTransformer2DModel's training step; `compile_` wraps the model in torch.compile (the
    compile happens in the warm-up steps, counted in setup)."""
    import torch
    from diffusers import FluxTransformer2DModel

    device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim,
    ).to(device)
    model.train()
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]

    side = size // 16  # token grid: latent size / 8, 2x2 patches
    n = side * side
    z = cfg.out_channels
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, n, z, generator=g).to(device)
    cloudy = torch.randn(batch, n, cfg.in_channels, generator=g).to(device)  # latent patch + cloud prob
    sar = torch.randn(batch, n, cfg.context_in_dim, generator=g).to(device)
    pooled = torch.randn(batch, cfg.vec_in_dim, generator=g).to(device)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    img_ids = torch.cat([grid, grid + torch.tensor([1.0, 0, 0])]).to(device)
    txt_ids = (grid + torch.tensor([2.0, 0, 0])).to(device)
    guidance = torch.ones(batch, device=device) if cfg.guidance_embed else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def one(i):
        del i
        t = torch.sigmoid(torch.randn(batch, device=device))  # logit-normal
        eps = torch.randn_like(x0)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        img = torch.cat([torch.cat([x_t, torch.zeros_like(x_t[..., :4])], -1), cloudy], 1)
        with autocast:
            out = forward(hidden_states=img, encoder_hidden_states=sar, pooled_projections=pooled, timestep=t,
                        img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out[:, :n].float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.999)
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            loss.detach().item()

    for i in range(2 if compile_ else 1):  # warm-up (allocations, kernels; torch.compile's graphs)
        one(i)
    setup_s = time.perf_counter() - t0
    median, best = time_steps(one, steps)
    return {"median_s": median, "best_s": best, "setup_s": setup_s, "device": str(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "compiled": compile_}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------





SIDES = ("jax", "torch", "torch_compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="tiny,base", help="comma-separated model variants")
    parser.add_argument("--size", type=int, default=256, help="patch size in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: by device kind)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--dtype", default="auto", help="JAX compute dtype: auto | float32 | bfloat16")
    parser.add_argument("--remat", default="none", help="JAX remat policy of the blocks")
    parser.add_argument("--sides", default="jax,torch",
                        help="comma-separated: jax, torch (diffusers eager), torch_compile (torch.compile); "
                        "none: only the feed test")
    parser.add_argument("--no-torch", action="store_true", help="the jax side alone (--sides jax)")
    parser.add_argument("--feed-steps", type=int, default=0,
                        help="also time this many JAX steps fed from the grain latent pipeline (0: off)")
    parser.add_argument("--feed-workers", type=int, default=0, help="grain worker processes of the feed test")
    parser.add_argument("--profile", action="store_true",
                        help="also trace one JAX step: its time by XLA op kind, page faults, system CPU")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak per device (0: look up)")
    parser.add_argument("--section", default="Train step", help="BENCHMARKS.md section to write")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    parser.add_argument("--json", default=None, help="also write the rows (and the peak) to this JSON file")
    args = parser.parse_args()
    sides = ["jax"] if args.no_torch else [] if args.sides == "none" else args.sides.split(",")
    if unknown := set(sides) - set(SIDES):
        parser.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")

    start = time.perf_counter()
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    batch = args.batch or jax.device_count() * (1 if on_cpu else 16)
    peak, peak_note = peak_tflops(backend, args.peak_tflops)
    n_img, n_txt = 2 * (args.size // 16) ** 2, (args.size // 16) ** 2

    rows, feeds = [], []
    for variant in args.variants.split(","):
        cfg = FluxConfig.from_dict(common.flux_config(variant))
        flops = train_lib.flux_train_flops(cfg, n_img, n_txt) * batch
        results = {}
        for side in sides:
            if side == "jax":
                results[side] = bench_jax(variant, args.size, batch, args.steps, dtype, args.remat,
                                          args.profile)
            else:
                results[side] = bench_torch(cfg, args.size, batch, args.steps, not on_cpu,
                                            compile_=side == "torch_compile")
        for side, r in results.items():
            tflops = flops / r["median_s"] / 1e12
            row = {
                "variant": variant, "side": side, "params": matmul_params(cfg), "flops": flops, **r,
                "samples_per_s": batch / r["median_s"], "tflops": tflops,
                "mfu": tflops / peak if peak else None,
            }
            rows.append(row)
            xla = f", XLA counts {r['xla_flops'] / 1e9:.1f} GFLOP" if r.get("xla_flops") else ""
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            print(f"{variant} {side}: {r['median_s']:.3f} s/step (best {r['best_s']:.3f}), "
                  f"{row['samples_per_s']:.2f} samples/s, {tflops * 1e3:.1f} GFLOP/s, MFU {mfu} "
                  f"(analytic {flops / 1e9:.1f} GFLOP/step{xla}; setup {r['setup_s']:.1f} s)", flush=True)
        if args.feed_steps:
            f = bench_feed(variant, args.size, batch, args.feed_steps, dtype, args.remat, args.feed_workers)
            feeds.append({"variant": variant, **f})
            print(f"{variant} feed: {f['resident_s']:.3f} s/step on a resident batch, {f['fed_s']:.3f} fed from "
                  f"the pipeline ({f['host_s'] * 1e3:.1f} ms/step of host work), pipeline alone "
                  f"{f['pipeline_s'] * 1e3:.1f} ms/batch", flush=True)

    if args.json:
        report.write_json(args.json, {"rows": [{k: v for k, v in r.items() if k != "profile"} for r in rows],
                                      "feeds": feeds, "peak_tflops": peak, "peak_note": peak_note,
                                      "dtype": dtype, "batch": batch})
    torch_note = ""
    torch_rows = [r for r in rows if r["side"] != "jax"]
    if torch_rows:
        t = torch_rows[0]
        precision = "float32" if t["device"] == "cpu" else "bfloat16 autocast (float32 weights)"
        modes = " and ".join(m for m, side in (("eager", "torch"), ("torch.compile", "torch_compile"))
                             if side in sides)
        torch_note = (f" PyTorch {t['torch']} on {t['device']} ({t['threads']} threads), diffusers "
                      f"FluxTransformer2DModel, {precision}, {modes}, SDPA attention.")
    command = shlex.join(["python", "bench/train_step.py", *sys.argv[1:]])
    lines = [
        f"## {args.section}",
        "",
        f"`{command.strip()}` ({datetime.date.today().isoformat()}; {time.perf_counter() - start:.0f} s)",
        "",
        f"Machine: {report.machine()}.",
        (f"Flow training step of the transformer on latents (no VAE): {args.size}x{args.size} patches = "
         f"{n_img // 2} target + {n_img // 2} cloudy + {n_txt} SAR tokens, global batch {batch}; JAX compute "
         f"dtype {dtype} (float32 parameters), remat {args.remat}, attention `jax.nn.dot_product_attention` "
         f"(cuDNN on GPU).{torch_note} Median of {args.steps} steps after the first (compiling/warm-up) "
         "step(s), each run to completion; setup = model init + compile + first step (torch.compile: two "
         "warm-up steps); compile = JAX's lower + compile alone."),
        ("FLOPs: analytic transformer forward + backward (`crrf_jax.train_lib.flux_train_flops`: matmuls "
         "x tokens x 6 + attention 12 L^2 h per block); XLA's cost analysis of the JAX step is listed for "
         "comparison: it counts the scanned blocks' body once. "
         + (f"MFU against a peak of {peak:.2f} TFLOP/s ({peak_note})." if peak else "MFU: no peak known.")),
        "",
        ("| variant | side | matmul params | GFLOP/step (XLA) | s/step (median) | s/step (best) | samples/s | "
        "achieved TFLOP/s | MFU | setup (s) | compile (s) |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        xla = f" ({r['xla_flops'] / 1e9:.1f})" if r.get("xla_flops") else ""
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['side']} | {r['params'] / 1e6:.1f} M | {r['flops'] / 1e9:.1f}{xla} | "
            f"{r['median_s']:.3f} | {r['best_s']:.3f} | {r['samples_per_s']:.2f} | {r['tflops']:.3f} | "
            f"{mfu} | {r['setup_s']:.1f} | {comp} |"
        )
    if not rows:  # the feed test alone: no step table
        lines = lines[:6]
    by = {(r["variant"], r["side"]): r["median_s"] for r in rows}
    ratios = [f"{v}: {by[(v, s)] / by[(v, 'jax')]:.2f}x vs {s}" for v in args.variants.split(",")
              for s in ("torch", "torch_compile") if (v, s) in by and (v, "jax") in by]
    if ratios:
        lines += ["", "JAX step speed-up (torch median / JAX median): " + "; ".join(ratios) + "."]
    for r in (r for r in rows if r.get("profile")):
        p = r["profile"]
        total = sum(t for _, t in p["kinds"])
        env = os.environ.get("GLIBC_TUNABLES")
        lines += [
            "",
            (f"Where the {r['variant']} JAX step's time goes (`--profile`: one traced step, XLA's ops summed by "
             f"kind over all threads, {total:.2f} s in all; the untraced step before it took {p['wall_s']:.2f} "
             f"s, {p['minflt']} minor page faults, {p['user_s']:.2f} s user and {p['sys_s']:.2f} s system CPU; "
             f"GLIBC_TUNABLES={env or 'unset'}):"),
            "",
            "| op kind | seconds | share |",
            "| --- | ---: | ---: |",
        ]
        top = p["kinds"][:12]
        lines += [f"| `{k}` | {t:.3f} | {t / total:.0%} |" for k, t in top]
        rest = total - sum(t for _, t in top)
        lines.append(f"| the other {len(p['kinds']) - len(top)} kinds | {rest:.3f} | {rest / total:.0%} |")
    if feeds:
        lines += [
            "",
            (f"Feeding the step: {feeds[0]['steps']} JAX steps fed from the flow stage's grain pipeline "
             f"(`latent_cache.iterator` over a synthetic latent cache, {feeds[0]['workers']} worker "
             "processes, uint8 cloud map; host batch -> global array -> step, dispatch asynchronous, as "
             "train.py's loop) against the same steps on one device-resident batch; host work = the time the "
             "loop spends getting and placing each batch (overlapped with the device's work while the step is "
             "slower); pipeline alone = `next()` with no step running."),
            "",
            ("| variant | resident batch (s/step) | fed from the pipeline (s/step) | host work (ms/step) | "
            "pipeline alone (ms/batch) | step waits for data |"),
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for f in feeds:
            waits = "yes" if f["fed_s"] > 1.05 * f["resident_s"] else "no"
            lines.append(f"| {f['variant']} | {f['resident_s']:.3f} | {f['fed_s']:.3f} | {f['host_s'] * 1e3:.1f} "
                         f"| {f['pipeline_s'] * 1e3:.1f} | {waits} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        report.write_section(args.section, text)


if __name__ == "__main__":
    main()
