#!/usr/bin/env bash
# The GPU check of issue 13, one script: under 8 minutes on one H100/H200, results into BENCHMARKS.md sections.
#
#   bash bench/gpu.sh                  # on the GPU machine (from the repository root, or anywhere)
#   bash bench/gpu.sh --dry-run        # here, on CPU: tiny sizes, 1-2 steps, the same steps and code paths
#   bash bench/gpu.sh --fetch-wheels   # here, with network: download the wheels the GPU machine lacks to .whl/
#
# Steps, each its own process under its own timeout (capped by what is left of the total deadline, so one
# failure or hang cannot eat the budget); a summary table at the end, also written as a section:
#   env        nvidia-smi, versions, carried wheels installed, JAX's devices
#   train      bench/train_step.py: the flow train step of base and large, JAX bf16 (cuDNN attention) vs
#              diffusers' FluxTransformer2DModel bf16 autocast, SDPA, eager; MFU against the chip's dense
#              bf16 peak (crrf_jax.trainer.PEAK_TFLOPS); init / compile / first-step times; one traced
#              step's time by op kind (--profile)                                            -> "GPU: train step"
#   sampling   bench/sampling.py: base, tiles/s at 1, 2, 4, 8 Euler steps and batches 128, 32, 8, with the
#              encode / transformer / decode split and compile times                            -> "GPU: sampling"
#   feed       bench/train_step.py --feed-steps: base steps fed from the grain latent pipeline vs from a
#              device-resident batch (is the step waiting for data?)                           -> "GPU: step feed"
#   compile    bench/train_step.py --sides torch_compile: diffusers under torch.compile, near the end, since
#              its compile may not fit the time left                                         -> "GPU: torch.compile"
#   scene      bench/predict_scene.py: the predict CLI on a 4096 x 4096 GeoTIFF scene, base at 4 steps and
#              batch 32, and with the sampler replaced by an identity (the host pipeline's own tiles/s: is the
#              device waiting for reading, blending or writing?); last, on what time is left  -> "GPU: scene"
# A section is written only by a step that finishes; the summary ("GPU: summary") says which did.
#
# What the GPU machine has and lacks (/work/.library/device/KINDS.md, 2026-11): Python 3.12 with torch 2.11
# (CUDA 13), jax/jaxlib 0.11.2 with the CUDA 13 plugin, flax, optax, orbax-checkpoint, etils, einops, tqdm,
# safetensors, huggingface_hub, PyYAML, protobuf, cloudpickle, absl; no network. It lacks diffusers, grain,
# array_record, rasterio (imported by crrf_jax.trainer's data modules) and ml_collections (configs): they travel
# as wheels in .whl/ (`--fetch-wheels` downloads them, pinned to the versions this repository is tested with,
# for CPython 3.12 manylinux x86-64; 45 MB, rasterio 36 of them). flax is carried too and installed only when the machine's
# flax is not 0.12.x (the API this code is written against). The machine's jax 0.11.2 (its CUDA build; jaxlib
# with the CUDA plugin is too large to carry) is in requirements.txt's range: the whole test suite and this
# script's dry run pass on CPU under Python 3.12, jax/jaxlib 0.11.2, flax 0.12.12 and diffusers 0.42.1
# (BENCHMARKS.md "Test suite"). The env step prints the versions.
#
# With the device tool: once here, `echo /.whl/ >> .git/info/exclude; bash bench/gpu.sh --fetch-wheels`; then
# run `bash bench/gpu.sh` with carry [".whl"] and timeout_s 540. The run copies BENCHMARKS.md (with the new
# sections) and its whole log to $OUT; copy the sections from the returned BENCHMARKS.md into the repository's.
#
# Dry run (CPU, about 3-4 minutes on 2 cores): `bash bench/gpu.sh --dry-run` (or CRRF_GPU_DRY_RUN=1), with the
# project's virtualenv active. It runs every step with the tiny variant on 64x64 patches, 1-2 steps, and
# writes its sections ("GPU dry run: ...") into a scratch copy of BENCHMARKS.md (via $CRRF_BENCHMARKS), not
# the real one, then checks that every section is there. Timeouts: $GPU_SH_TOTAL_S (the total deadline) and
# $GPU_SH_<STEP>_S (ENV, TRAIN, SAMPLING, FEED, COMPILE) override the defaults below.

set -u -o pipefail
cd "$(dirname "$0")/.."

dry=${CRRF_GPU_DRY_RUN:-0}
fetch=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    --fetch-wheels) fetch=1 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

# Wheels the GPU machine lacks, at the versions this repository is tested with (no dependencies resolved:
# their own needs are on the machine already, or listed here).
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
        ml_collections==1.1.0 rasterio==1.4.4 affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2 flax==0.12.8)

if [ "$fetch" = 1 ]; then
  mkdir -p .whl
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
fi

PY=${PYTHON:-python3}
out=${OUT:-$(mktemp -d /tmp/gpu_sh.XXXXXX)}
mkdir -p "$out"
log="$out/gpu.log"
: >"$log"
start=$(date +%s)

if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
  scratch=$(mktemp -d /tmp/gpu_sh_dry.XXXXXX)
  cp BENCHMARKS.md "$scratch/BENCHMARKS.md"
  export CRRF_BENCHMARKS="$scratch/BENCHMARKS.md"
  prefix="GPU dry run"
  total=${GPU_SH_TOTAL_S:-900}
  t_env=${GPU_SH_ENV_S:-60} t_train=${GPU_SH_TRAIN_S:-240} t_sampling=${GPU_SH_SAMPLING_S:-200}
  t_feed=${GPU_SH_FEED_S:-150} t_compile=${GPU_SH_COMPILE_S:-180}
  train_args=(--variants tiny --size 64 --steps 1 --batch 2)
  sampling_args=(--variant tiny --size 64 --steps 2,1 --batch 2,1 --sweep-steps 2 --repeats 1 --budget-s 120)
  feed_args=(--variants tiny --size 64 --steps 1 --batch 2 --feed-steps 2 --feed-workers 1)
  scene_args=(--variants tiny --sizes 256 --steps 1 --batch 2)
  t_scene=${GPU_SH_SCENE_S:-120}
  compile_args=(--variants tiny --size 64 --steps 1 --batch 2)
else
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in the train step's process
  prefix="GPU"
  total=${GPU_SH_TOTAL_S:-470}
  t_env=${GPU_SH_ENV_S:-45} t_train=${GPU_SH_TRAIN_S:-200} t_sampling=${GPU_SH_SAMPLING_S:-150}
  t_feed=${GPU_SH_FEED_S:-80} t_compile=${GPU_SH_COMPILE_S:-120}
  train_args=(--variants base,large --steps 5)
  sampling_args=(--variant base --steps 4,1,2,8 --batch 128,32,8 --sweep-steps 4 --repeats 3 --budget-s 100)
  feed_args=(--variants base --steps 3 --feed-steps 30 --feed-workers 4)
  scene_args=(--variants base --sizes 4096 --steps 4 --batch 32)
  t_scene=${GPU_SH_SCENE_S:-100}
  compile_args=(--variants base --steps 5)
fi
export PYTHONUNBUFFERED=1

names=() statuses=() seconds=()

# run NAME TIMEOUT COMMAND...: runs COMMAND under min(TIMEOUT, time left), logs it, records its status.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((total - ($(date +%s) - start)))
  [ "$left" -lt "$limit" ] && limit=$left
  local t0 rc status
  t0=$(date +%s)
  if [ "$limit" -lt 10 ]; then
    status="skipped (no time left)"
  else
    echo "=== $name (timeout ${limit} s): $(printf '%q ' "$@")" | tee -a "$log"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status="timed out after ${limit} s" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  names+=("$name") statuses+=("$status") seconds+=($(($(date +%s) - t0)))
  echo "=== $name: $status ($((${seconds[-1]})) s)" | tee -a "$log"
  cp "${CRRF_BENCHMARKS:-BENCHMARKS.md}" "$out/BENCHMARKS.md" 2>/dev/null || true
}

env_check() {
  if [ "$dry" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || return 1
    if ls .whl/*.whl >/dev/null 2>&1; then
      local wheels=() w
      for w in .whl/*.whl; do [[ $(basename "$w") == flax-* ]] || wheels+=("$w"); done
      if ! "$PY" -c 'import flax, sys; sys.exit(not flax.__version__.startswith("0.12."))' 2>/dev/null; then
        wheels+=(.whl/flax-*.whl)
      fi
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" || return 1
    else
      echo "no .whl/ folder: diffusers, grain, rasterio, ml_collections must be installed already"
    fi
  fi
  "$PY" - <<'EOF'
import importlib, jax
print("jax", jax.__version__, jax.default_backend(), jax.devices())
for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "rasterio", "ml_collections", "torch",
             "diffusers"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
import torch
print("torch cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import sys
sys.path.insert(0, "bench")
import train_step  # the benches' imports, all of them
print("peak", train_step.peak_tflops(jax.default_backend(), 0.0))
EOF
}

[ "$dry" = 0 ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export -f env_check
export dry PY
run env "$t_env" bash -c env_check
run train "$t_train" "$PY" bench/train_step.py "${train_args[@]}" --sides jax,torch --profile \
  --section "$prefix: train step" --write
run sampling "$t_sampling" "$PY" bench/sampling.py "${sampling_args[@]}" --section "$prefix: sampling" --write
run feed "$t_feed" "$PY" bench/train_step.py "${feed_args[@]}" --sides none --section "$prefix: step feed" \
  --write
run compile "$t_compile" "$PY" bench/train_step.py "${compile_args[@]}" --sides torch_compile \
  --section "$prefix: torch.compile" --write
# Last: the issue's own figures come first; this one only asks whether the device waits for the host.
run scene "$t_scene" "$PY" bench/predict_scene.py "${scene_args[@]}" --model identity,sampler --uncertainty \
  --section "$prefix: scene" --write

# Summary: a table of the steps, printed and written as a section.
elapsed=$(($(date +%s) - start))
summary="## $prefix: summary"$'\n\n'"\`bash bench/gpu.sh $*\` ($(date -u +%F), ${elapsed} s in all; load average"
summary+=" $(cut -d' ' -f1-3 /proc/loadavg) at the end)"$'\n\n'"| step | status | seconds |"$'\n'"| --- | --- | ---: |"
for i in "${!names[@]}"; do summary+=$'\n'"| ${names[$i]} | ${statuses[$i]} | ${seconds[$i]} |"; done
echo "$summary" | tee -a "$log"
SUMMARY="$summary" "$PY" -c 'import os, sys; sys.path.insert(0, "bench"); import report
report.write_section(os.environ["SUMMARY"].splitlines()[0][3:], os.environ["SUMMARY"])' || true
cp "${CRRF_BENCHMARKS:-BENCHMARKS.md}" "$out/BENCHMARKS.md" 2>/dev/null || true

failed=0
for s in "${statuses[@]}"; do [ "$s" = ok ] || failed=1; done
if [ "$dry" = 1 ]; then
  for section in "train step" "sampling" "step feed" "torch.compile" "scene" "summary"; do
    grep -q "^## $prefix: $section\$" "$CRRF_BENCHMARKS" || { echo "dry run: section '$prefix: $section' missing"; failed=1; }
  done
  echo "dry run: sections written to $CRRF_BENCHMARKS (BENCHMARKS.md untouched); log $log"
fi
exit $failed
