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
            scale_factor=1.0,  # measured on training data after the VAE stage (DESIGN section 4)
            shift_factor=0.0,
        )
    )


def cloud_cnn_config(variant: str) -> ml_collections.ConfigDict:
    """The cloud-probability encoder: strided convolutions, mean pool, Linear to the transformer width."""
    widths = {"tiny": (8, 16), "base": (32, 64, 128), "large": (32, 64, 128, 256), "flux": (32, 64, 128, 256)}
    _check(variant)
    return ml_collections.ConfigDict(dict(channels=widths[variant], out_dim=flux_config(variant).vec_in_dim))


def model_config(variant: str, s2_bands: int = 13) -> ml_collections.ConfigDict:
    """All four networks of `variant`."""
    return ml_collections.ConfigDict(
        dict(
            variant=variant,
            flux=flux_config(variant),
            vae_s2=autoencoder_config(variant, s2_bands),
            vae_s1=autoencoder_config(variant, 2),
            cloud_cnn=cloud_cnn_config(variant),
        )
    )


def _check(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {VARIANTS}")
