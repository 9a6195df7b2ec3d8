"""SEN12MS-CR, all 13 Sentinel-2 bands, the `base` model (CR_RF's transformer) unless a variant is given.

One GPU, the whole pipeline (VAE S2, VAE S1, latent statistics, flow, refiner), resumable:

    python train.py --config=configs/sen12mscr.py --config.data.root=/data/SEN12MSCR --workdir=runs/base

One stage, another variant, RGB only, bf16 compute:

    python train.py --config=configs/sen12mscr.py:variant=large,stage=flow,bands=rgb \
        --config.dtype=bfloat16 --config.data.root=/data/SEN12MSCR --workdir=runs/large

Multi-host (e.g. 4 hosts x 8 GPUs, or a TPU pod slice): run the same command on every host with the
coordinator in the environment (JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=i on
GPU; nothing on TPU), sharding parameters with FSDP inside each host:

    python train.py --config=configs/sen12mscr.py:variant=flux --config.distributed=True \
        --config.mesh.data=-1 --config.mesh.fsdp=8 --config.dtype=bfloat16 --config.remat_policy=dots_saveable \
        --config.data.source=tfds --config.data.tfds_data_dir=gs://bucket/tfds --workdir=gs://bucket/runs/flux

Config string keys: variant (tiny|base|large|flux), stage (vae_s2|vae_s1|latent_stats|flow|refiner), bands
("" = all 13, rgb, or comma-separated names such as B02,B03,B04,B08).
"""

from configs import common


def get_config(arg: str | None = None):
    args = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    unknown = set(args) - {"variant", "stage", "bands"}
    if unknown:
        raise ValueError(f"unknown config-string keys {sorted(unknown)}; use variant=, stage=, bands=")
    c = common.base_config(args.get("variant", "base"), args.get("bands") or None)
    c.stage = args.get("stage", "")
    c.data.root = ""  # required: --config.data.root=/path/to/SEN12MSCR
    return c
