"""Model variants and the defaults every config shares.

A variant fixes the sizes of the four networks: the rectified-flow transformer (`flux`), the Sentinel-2 and
Sentinel-1 autoencoders (`vae_s2`, `vae_s1`) and the cloud-probability encoder (`cloud_cnn`). Field names of
`flux` and `vae_*` are BFL's FluxParams / AutoEncoderParams names, so FLUX weights import directly.

    tiny   tests and the CPU demo              hidden 64,  2 heads,  1 double +  1 single block
    base   CR_RF's real transformer            hidden 768, 6 heads,  4 double +  8 single blocks
    large  a bigger model for pods             hidden 1536, 12 heads, 8 double + 16 single blocks
    flux   FLUX.1-dev sizes (FSDP only)        hidden 3072, 24 heads, 19 double + 38 single blocks
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

VARIANTS = ("tiny", "base", "large", "flux")

# Latent geometry shared by every variant: 16 latent channels, downsampling 8, 2x2 patches -> 64-d tokens.
Z_CHANNELS = 16
PATCH = 2


def flux_config(variant: str) -> ml_collections.ConfigDict:
    """The transformer's FluxParams for `variant`. in/out channels are 16 latent channels x 2x2 patches."""
    sizes = {
        #        hidden heads depth single axes_dim
        "tiny": (64, 2, 1, 1, (4, 14, 14)),
        "base": (768, 6, 4, 8, (16, 56, 56)),
        "large": (1536, 12, 8, 16, (16, 56, 56)),
        "flux": (3072, 24, 19, 38, (16, 56, 56)),
    }
    _check(variant)
    hidden, heads, depth, single, axes_dim = sizes[variant]
    return ml_collections.ConfigDict(
        dict(
            # Image-stream tokens: 16 latent channels x 2x2 patch, plus the cloud-probability map pooled to the
            # latent grid and patchified (4 channels; zeros on the noisy-target tokens).
            in_channels=Z_CHANNELS * PATCH * PATCH + PATCH * PATCH,
            out_channels=Z_CHANNELS * PATCH * PATCH,
            # y comes from the cloud-probability encoder; 768 keeps FLUX.1's vector_in importable.
            vec_in_dim=hidden if variant != "flux" else 768,
            # The context stream carries SAR latent tokens (FLUX's text slot).
            context_in_dim=Z_CHANNELS * PATCH * PATCH,
            hidden_size=hidden,
            mlp_ratio=4.0,
            num_heads=heads,
            depth=depth,
            depth_single_blocks=single,
            axes_dim=axes_dim,
            theta=10_000,
            qkv_bias=True,
            guidance_embed=variant == "flux",
        )
    )


def autoencoder_config(variant: str, bands: int) -> ml_collections.ConfigDict:
    """An AutoEncoderParams for `bands` input channels (13 for Sentinel-2, 2 for Sentinel-1, 3 for RGB)."""
    sizes = {
        #        ch  ch_mult        num_res_blocks norm_groups
        "tiny": (16, (1, 2, 2, 2), 1, 8),
        "base": (64, (1, 2, 4, 4), 2, 32),
        "large": (128, (1, 2, 4, 4), 2, 32),
        "flux": (128, (1, 2, 4, 4), 2, 32),
    }
    _check(variant)
    ch, ch_mult, num_res_blocks, norm_groups = sizes[variant]
    return ml_collections.ConfigDict(
        dict(
            resolution=256,
            in_channels=bands,
            ch=ch,
            out_ch=bands,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            z_channels=Z_CHANNELS,
            norm_groups=norm_groups,  # GroupNorm groups (FLUX uses 32); not a BFL field
            scale_factor=1.0,  # measured on training data after the VAE stage (docs/ARCHITECTURE.md, Models)
            shift_factor=0.0,
        )
    )


def cloud_cnn_config(variant: str) -> ml_collections.ConfigDict:
    """The cloud-probability encoder: strided convolutions, mean pool, Linear to the transformer width."""
    widths = {"tiny": (8, 16), "base": (32, 64, 128), "large": (32, 64, 128, 256), "flux": (32, 64, 128, 256)}
    _check(variant)
    return ml_collections.ConfigDict(dict(channels=widths[variant], out_dim=flux_config(variant).vec_in_dim))


def refiner_config(variant: str, bands: int) -> ml_collections.ConfigDict:
    """The pixel-space refiner after the flow (crrf_jax/models/refiner.py); enabled=False leaves it out."""
    sizes = {"tiny": (24, (1, 2, 4, 8)), "base": (64, (1, 2, 4, 8, 16, 1)), "large": (96, (1, 2, 4, 8, 16, 1)),
             "flux": (128, (1, 2, 4, 8, 16, 1))}
    _check(variant)
    width, dilations = sizes[variant]
    # gain: the kept input pixel gets a learned per-pixel brightness factor (shadows; models/refiner.py).
    return ml_collections.ConfigDict(dict(enabled=True, bands=bands, width=width, dilations=dilations, gain=False))


def model_config(variant: str, s2_bands: int = 13) -> ml_collections.ConfigDict:
    """All networks of `variant`."""
    return ml_collections.ConfigDict(
        dict(
            variant=variant,
            flux=flux_config(variant),
            vae_s2=autoencoder_config(variant, s2_bands),
            vae_s1=autoencoder_config(variant, 2),
            cloud_cnn=cloud_cnn_config(variant),
            refiner=refiner_config(variant, s2_bands),
            # With flux.guidance_embed (the flux variant, FLUX.1-dev's layout): the constant the guidance
            # embedder receives in training and sampling (crrf_jax/models/flux.py CloudRemovalFlux).
            embedded_guidance=1.0,
            # Cloudy dates per sample, at most (1 = single image); one model serves any T up to this.
            max_dates=1,
            # Whether the model has a Sentinel-1 input and autoencoder (False for datasets without SAR).
            sar=True,
        )
    )


def _check(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {VARIANTS}")


# --------------------------------------------------------------------------------------------------------------
# Training defaults
# --------------------------------------------------------------------------------------------------------------



def optim_config(*, steps: int, lr: float, batch_size: int, warmup_steps: int = 500) -> ml_collections.ConfigDict:
    """One stage's optimisation: AdamW, warmup + cosine, clipping, accumulation, EMA, logging cadence."""
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch_size,  # global batch, split over processes and the ('data', 'fsdp') mesh axes
            lr=lr,
            warmup_steps=warmup_steps,
            min_lr_ratio=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            grad_clip=1.0,
            grad_accum=1,  # micro-batches per step: batch_size is split, gradients averaged, one update
            max_bad_steps=10,  # consecutive non-finite steps (each skipped on device) that halt the run
            ema_decay=0.999,
            log_every=50,
            preview_every=1000,
            checkpoint_every=1000,
            keep_checkpoints=3,
        )
    )


# The benchmarks `config.data.dataset` names: their band set (a band spec; "" = all 13), input dates per
# sample (config.data.dates) and SAR. crrf_jax/data/sources.py DATASET_INFO states the same facts for the
# readers (configs import no data code); tests/test_config.py checks that the two agree.
RGBN = "B04,B03,B02,B08"  # R, G, B, NIR as Sentinel-2 names: CUHK-CR and Sen2_MTC_New
DATASETS = {
    "sen12mscr": {"bands": "", "dates": 1, "has_sar": True},
    "cuhk_cr1": {"bands": RGBN, "dates": 1, "has_sar": False},
    "cuhk_cr2": {"bands": RGBN, "dates": 1, "has_sar": False},
    "sen2_mtc_new": {"bands": RGBN, "dates": 3, "has_sar": False},
    "sen12mscr_ts": {"bands": "", "dates": 3, "has_sar": True},  # UnCRtainTS's default: 3 input dates
}


def config_args(arg: str | None, allowed) -> dict[str, str]:
    """A config string "key=value,key=value" (`--config=configs/x.py:variant=tiny,stage=flow`) as a dict;
    ValueError naming keys outside `allowed`."""
    args = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    unknown = set(args) - set(allowed)
    if unknown:
        raise ValueError(f"unknown config-string keys {sorted(unknown)}; use {', '.join(f'{k}=' for k in allowed)}")
    return args


def base_config(variant: str = "base", s2_bands=None, dataset: str = "sen12mscr") -> ml_collections.ConfigDict:
    """Everything but the data location; the configs of each benchmark and the demos start from this.

    `dataset` (a key of `DATASETS`) sets config.data.dataset, .dates and .has_sar, and the band set when
    `s2_bands` is None (the RGBN datasets: 4 bands, which size the networks).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {tuple(DATASETS)}")
    if s2_bands is None and DATASETS[dataset]["bands"]:
        s2_bands = DATASETS[dataset]["bands"]
    # The band count sizes the networks, so the spec is parsed here, by the data contract's one parser (a
    # NumPy-only module).
    from crrf_jax.config import resolve_bands  # noqa: PLC0415 - keeps configs importable cheaply

    bands = resolve_bands(s2_bands)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = ""  # "" runs every stage in order (crrf_jax/config.py STAGES); or one of them
    c.model = model_config(variant, len(bands))
    c.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU (parameters stay float32)
    c.remat_policy = "none"  # transformer blocks: none | full | dots_saveable | nothing_saveable

    c.data = ml_collections.ConfigDict()
    c.data.dataset = dataset  # sen12mscr | cuhk_cr1 | cuhk_cr2 | sen2_mtc_new | sen12mscr_ts
    c.data.dates = DATASETS[dataset]["dates"]  # cloudy input dates per sample (1: single image)
    c.data.has_sar = DATASETS[dataset]["has_sar"]  # False: batches have no s1
    # The model follows its data: as many cloudy-date groups as the samples carry, SAR where they have it.
    c.model.max_dates, c.model.sar = c.data.dates, c.data.has_sar
    # Multi-temporal data: the refiner's kept pixel gets a brightness factor (models/refiner.py `gain`), which
    # undoes cloud shadows (the RGBN score does not flag them); measured on configs/demo_mt.py (BENCHMARKS.md,
    # "Multi-temporal quality on held-out synthetic scenes"). Single-image models: not measured, off.
    c.model.refiner.gain = c.data.dates > 1
    c.data.downsample = 1  # integer shrink of the images on read (CUHK-CR: 2, EMRDM's 512 -> 256)
    c.data.source = "geotiff"  # geotiff (the raw official layout of any dataset) | tfds (SEN12MS-CR only)
    c.data.root = ""  # the dataset's root (official layout); the TFDS manual_dir too
    c.data.tfds_data_dir = ""  # where the ArrayRecord shards are (source=tfds)
    c.data.protocol = "exact"  # exact | legacy (reproduces the published split leak; comparisons only)
    c.data.bands = s2_bands if s2_bands is not None else ""  # "" = all 13; "rgb"; or "B02,B03,B04,B08"
    c.data.crop_size = 256
    c.data.worker_count = 2
    # Threads per reading process; None: one for GeoTIFFs, the process's share of the cores for ArrayRecord
    # (pipeline.default_read_threads). More only for high-latency storage.
    c.data.read_threads = config_dict.placeholder(int)
    c.data.on_error = "raise"  # raise | skip (bad samples are logged and counted)
    c.data.cache = False  # training samples held in memory after their first read (datasets that fit: the demo)
    c.data.compute_cloud_prob = True  # compute missing s2cloudless maps (SEN12MS-CR-TS: date coverage) first

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.distributed = False  # jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)

    # Pretrained FLUX.1 weights seeding a stage's fresh (not resumed) model; "" = random initialisation.
    # A .safetensors file or a folder of one (or of shards with their .index.json); BFL or diffusers keys,
    # told apart by the keys. crrf_jax/models/pretrained.py has the rules (README: "Starting from FLUX.1").
    c.init = ml_collections.ConfigDict()
    c.init.flux = ""  # FLUX.1 transformer (flux1-dev.safetensors, or diffusers' transformer/ folder)
    c.init.vae_s2 = ""  # FLUX VAE (ae.safetensors or diffusers' vae/); needs B04, B03, B02 and FLUX's widths
    c.init.vae_s1 = ""  # must stay "": Sentinel-1 has no RGB bands for a FLUX VAE

    c.vae_s2 = optim_config(steps=100_000, lr=1e-4, batch_size=16, warmup_steps=1000)
    c.vae_s2.crop_size = 0  # training crops of the autoencoders (0 = data.crop_size)
    c.vae_s2.kl_weight = 1e-6
    c.vae_s2.sam_weight = 0.0  # > 0 adds the spectral-angle loss; early in training it slows L1 learning
    c.vae_s1 = optim_config(steps=50_000, lr=1e-4, batch_size=16, warmup_steps=1000)
    c.vae_s1.crop_size = 0
    c.vae_s1.kl_weight = 1e-6
    c.vae_s1.sam_weight = 0.0
    c.latent_stats = ml_collections.ConfigDict(dict(batches=64, batch_size=16))
    c.flow = optim_config(steps=200_000, lr=1e-4, batch_size=32, warmup_steps=2000)
    c.flow.t_sampling = "logit_normal"  # logit_normal | uniform
    # The t = 1 end: "cloudy" = the encoded cloudy image + source_sigma * noise (sampling starts from the
    # cloudy image), or "noise" (FLUX's text-to-image form). See BENCHMARKS.md "Quality" for the comparison.
    c.flow.source = "cloudy"
    c.flow.source_sigma = 0.2
    c.flow.shift_schedule = True  # FLUX's resolution-shifted sampling times (False: uniform)
    c.flow.sar_dropout = 0.1
    c.flow.cloudy_dropout = 0.1
    c.flow.joint_dropout = 0.1  # both conditions at once: trains the unconditional branch CFG uses
    c.flow.use_sar = True
    c.flow.date_dropout = 0.2  # several cloudy dates: each absent with this probability (one always kept)
    c.flow.pixel_loss_weight = 0.0
    c.flow.cache_latents = False  # encode the training set once and train on cached latents
    c.flow.sample_steps = 8  # Euler steps for previews and evaluation
    c.flow.guidance_scale = 1.0  # classifier-free guidance at sampling (1 = off)

    # The pixel-space refiner, trained on the frozen flow's sampled predictions (config.model.refiner).
    c.refiner = optim_config(steps=20_000, lr=2e-4, batch_size=16, warmup_steps=500)
    c.refiner.ssim_weight = 0.5  # loss = L1 + ssim_weight * (1 - SSIM) + sam_weight * spectral angle (rad)
    c.refiner.sam_weight = 0.2
    c.refiner.sar_dropout = 0.1  # trains the SAR-absent mode
    c.refiner.input = "flow"  # "flow": sampled flow predictions; "roundtrip": the cloudy image's VAE round trip
    c.refiner.flow_steps = 0  # Euler steps of the flow samples it trains on (0 = flow.sample_steps)

    c.eval = ml_collections.ConfigDict(
        dict(split="test", batch_size=8, num_samples=1, cloud_threshold=0.5, max_images=0, write_geotiff=False)
    )
    # "sen12mscr": UnCRtainTS / EMRDM's SEN12MS-CR metrics; "rgb255": also EMRDM's CUHK-CR metrics (8-bit PSNR /
    # SSIM, and LPIPS from lpips_weights, an LPIPS-alex safetensors file: python -m crrf_jax.tools.lpips_weights);
    # "sen2mtc": also EMRDM's Sen2_MTC_New metrics (PSNR / SSIM / SAM of per-image stretched RGB, and LPIPS).
    c.eval.metric_set = "sen12mscr"
    c.eval.lpips_weights = ""
    c.peak_tflops = 0.0  # per device, for MFU; 0 = look up the device kind (unknown kinds report no MFU)
    return c
