"""Synthetic SEN12MS-CR scenes written as real GeoTIFFs in the official layout.

A scene is a smooth random land-cover map (water, vegetation, bare soil, urban, snow) rendered three ways:

- `s2`: cloud-free Sentinel-2 L1C digital numbers (uint16, 13 bands in file order B01..B08, B8A, B09..B12),
  each class with its own top-of-atmosphere spectrum plus texture;
- `s2_cloudy`: the same ground on another date under thick clouds (bright and flat in the visible and NIR,
  high SWIR), thin semi-transparent clouds with cirrus visible in B10, and cloud shadows (darkened ground
  offset from the thick clouds);
- `s1`: Sentinel-1 backscatter in dB (float32, VV and VH) that follows the land cover (water dark, urban
  bright, vegetation medium, VH below VV) with multiplicative speckle. SAR sees through clouds: it never
  depends on them.

Everything is deterministic given the seed. The land, the optical texture, the clouds and the SAR speckle draw
from independent random streams, so changing the cloud cover leaves `s1` and `s2` untouched.

CLI: `python -m crrf_jax.data.synthetic --root DIR --n 32 --size 256`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

LAND_CLASSES = ("water", "vegetation", "bare_soil", "urban", "snow")

# Top-of-atmosphere L1C digital numbers (reflectance x 10000) per class, bands B01..B08, B8A, B09..B12.
# B01 carries the atmosphere's path radiance, B09 the water-vapour absorption, B10 (1375 nm) is near zero
# except over high (cirrus) clouds.
_SPECTRA = np.array(
    [
        # B01   B02   B03   B04   B05   B06   B07   B08   B8A   B09  B10   B11   B12
        [1350, 1080, 860, 560, 480, 400, 370, 330, 300, 110, 8, 110, 70],  # water
        [1250, 960, 1000, 700, 1200, 2300, 2800, 2900, 3100, 950, 14, 1750, 850],  # vegetation
        [1450, 1300, 1350, 1500, 1750, 1950, 2100, 2200, 2350, 750, 18, 3100, 2500],  # bare soil
        [1550, 1400, 1380, 1420, 1500, 1650, 1750, 1800, 1900, 620, 16, 2200, 1900],  # urban
        [6200, 6000, 5900, 5700, 5600, 5500, 5400, 5200, 5100, 1600, 10, 300, 200],  # snow (dark in SWIR)
    ],
    dtype=np.float32,
)
# A thick cloud: bright and nearly flat from B01 to B8A, high in the SWIR (unlike snow), some B10 signal.
_THICK_CLOUD = np.array(
    [6900, 6700, 6600, 6600, 6700, 6800, 6900, 6800, 7000, 2400, 180, 5300, 3700], dtype=np.float32
)
# A thin cloud / cirrus layer: a grey veil, strong in B10 where clear air shows nearly nothing.
_THIN_CLOUD = np.array(
    [4200, 4000, 3900, 3800, 3800, 3800, 3800, 3700, 3700, 1200, 700, 2900, 2100], dtype=np.float32
)
# Backscatter in dB (VV, VH) per class, and how strongly speckle-free texture varies (dB standard deviation).
_SAR_DB = np.array([[-21.0, -28.0], [-9.5, -15.5], [-13.0, -20.0], [-4.0, -10.5], [-14.0, -21.0]], np.float32)
_SAR_TEXTURE_DB = np.array([0.8, 1.5, 1.5, 2.5, 1.0], np.float32)
_SAR_LOOKS = 4.4  # equivalent number of looks of the multiplicative (Gamma) speckle

# Land-cover class weights per season: (water, vegetation, bare soil, urban, snow). Snow only in winter.
_SEASON_COVER = {
    "ROIs1158_spring": (0.8, 1.3, 0.9, 0.6, 0.0),
    "ROIs1868_summer": (0.8, 1.5, 0.8, 0.6, 0.0),
    "ROIs1970_fall": (0.8, 1.1, 1.1, 0.6, 0.0),
    "ROIs2017_winter": (0.8, 1.0, 1.0, 0.6, 0.35),
}

# Default ROI cycle. Test and validation ROIs are real ones from the UnCRtainTS/EMRDM split lists, so the
# exact splits give members of every split from 4 scenes on; spring s1_1 is a train ROI whose name is a prefix
# of the test ROI s1_106 (the substring-matching quirk of the legacy protocol).
_TRAIN_ROIS = (
    ("ROIs1158_spring", 1),
    ("ROIs1868_summer", 36),
    ("ROIs1970_fall", 52),
    ("ROIs2017_winter", 91),
    ("ROIs1158_spring", 57),
    ("ROIs1868_summer", 148),
)
_TEST_ROIS = (("ROIs1158_spring", 106), ("ROIs1970_fall", 139))
_VAL_ROIS = (("ROIs2017_winter", 22), ("ROIs1868_summer", 19))


def default_layout(n_scenes: int) -> list[tuple[str, int]]:
    """The (season, roi) of each of `n_scenes` scenes: cycles of 8 with 6 train, 1 test and 1 validation."""
    layout = []
    for i in range(n_scenes):
        cycle, slot = divmod(i, 8)
        if slot == 1:
            layout.append(_TEST_ROIS[cycle % len(_TEST_ROIS)])
        elif slot == 3:
            layout.append(_VAL_ROIS[cycle % len(_VAL_ROIS)])
        else:
            train_slot = (0, None, 1, None, 2, 3, 4, 5)[slot]
            layout.append(_TRAIN_ROIS[train_slot])
    return layout


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Gaussian random field with correlation length about `scale` pixels, zero mean, unit std, float32."""
    noise = rng.standard_normal(shape).astype(np.float32)
    ky = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    spectrum = np.fft.rfft2(noise) * np.exp(-((ky**2 + kx**2) * (np.pi * scale) ** 2 / 2.0))
    field = np.fft.irfft2(spectrum, s=shape).astype(np.float32)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _land_cover(rng: np.random.Generator, shape: tuple[int, int], season: str) -> np.ndarray:
    """Segmentation (H, W) uint8 into LAND_CLASSES: argmax of smooth per-class fields plus seasonal biases."""
    weights = np.asarray(_SEASON_COVER.get(season, _SEASON_COVER["ROIs1158_spring"]), np.float32)
    scale = min(shape) / rng.uniform(3.0, 6.0)
    fields = np.stack([smooth_field(rng, shape, scale) for _ in LAND_CLASSES])
    fields += np.log(np.maximum(weights, 1e-6))[:, None, None] * 1.5
    fields[weights == 0] = -np.inf
    return np.argmax(fields, axis=0).astype(np.uint8)


def _ground_spectra(rng: np.random.Generator, cover: np.ndarray) -> np.ndarray:
    """Cloud-free reflectance (H, W, 13) in DN, float32: class spectra times texture."""
    shape = cover.shape
    brightness = 1.0 + 0.08 * smooth_field(rng, shape, 6.0) + 0.03 * rng.standard_normal(shape, np.float32)
    vigour = 0.12 * smooth_field(rng, shape, 12.0)  # red-edge/NIR strength of vegetation
    ground = _SPECTRA[cover] * brightness[..., None]
    nir = slice(4, 9)  # B05..B8A
    ground[..., nir] *= np.where(cover == 1, 1.0 + vigour, 1.0)[..., None]
    return ground


def _clouds(rng: np.random.Generator, shape: tuple[int, int], cover: float | None):
    """Thick opacity, thin opacity and shadow strength maps (H, W) float32 in [0, 1]."""
    if cover is None:  # a quarter of the scenes nearly clear, the rest from light to overcast
        cover = rng.uniform(0.0, 0.05) if rng.random() < 0.25 else rng.uniform(0.15, 0.9)
    base = min(shape) / rng.uniform(4.0, 8.0)
    field = smooth_field(rng, shape, base) + 0.35 * smooth_field(rng, shape, base / 4)
    threshold = np.quantile(field, 1.0 - cover) if cover > 0 else np.inf
    thick = np.clip((field - threshold) / 0.5, 0.0, 1.0).astype(np.float32)
    thin_field = smooth_field(rng, shape, base * 1.5)
    thin = np.clip((thin_field - 0.3) / 1.5, 0.0, 1.0) * rng.uniform(0.2, 0.6) * min(1.0, 3 * cover + 0.1)
    # Shadows: the thick-cloud opacity, moved along a random sun azimuth by a cloud-height-dependent offset.
    azimuth, offset = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.03, 0.08) * min(shape)
    shift = (round(offset * np.sin(azimuth)), round(offset * np.cos(azimuth)))
    shadow = _shift(thick, shift) * (1.0 - thick)
    return thick, thin.astype(np.float32), shadow.astype(np.float32)


def _shift(image: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """`image` (H, W) moved by `offset` (rows, columns) pixels, zero-filled where nothing moves in."""
    out = np.zeros_like(image)
    (dy, dx), (h, w) = offset, image.shape
    dy, dx = max(-h, min(h, dy)), max(-w, min(w, dx))
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _sar(rng: np.random.Generator, cover: np.ndarray) -> np.ndarray:
    """Backscatter (H, W, 2) float32 in dB, VV then VH, with texture and multiplicative Gamma speckle."""
    texture = smooth_field(rng, cover.shape, 5.0)[..., None] * _SAR_TEXTURE_DB[cover][..., None]
    mean_db = _SAR_DB[cover] + texture
    speckle = rng.gamma(_SAR_LOOKS, 1.0 / _SAR_LOOKS, size=mean_db.shape).astype(np.float32)
    linear = np.power(10.0, mean_db / 10.0, dtype=np.float32) * speckle
    return np.clip(10.0 * np.log10(np.maximum(linear, 1e-6)), -40.0, 10.0).astype(np.float32)


def _to_dn(reflectance: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(reflectance), 0, 65535).astype(np.uint16)


def synthetic_scene(
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    *,
    season: str = "ROIs1158_spring",
    cloud_cover: float | None = None,
    acquisition: int | None = None,
) -> dict[str, np.ndarray]:
    """One synthetic scene of `size` (int or (height, width)) pixels, deterministic given `seed`.

    Returns s1 (H, W, 2) float32 dB (VV, VH); s2 and s2_cloudy (H, W, 13) uint16 L1C DN; land_cover (H, W)
    uint8 indexing LAND_CLASSES; thick, thin, shadow (H, W) float32 in [0, 1] (cloud opacities and shadow
    strength). `cloud_cover` in [0, 1] is the thick-cloud fraction (random when None); it changes only
    s2_cloudy and the cloud maps. `acquisition` (None or an int) numbers the cloudy date: scenes of one seed
    and different acquisitions share the ground, `s2` and `s1` but have their own clouds, shadows and
    per-date radiometry (a time series whose clouds move); None is the single cloudy date of old.
    """
    shape = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(shape) < 8:
        raise ValueError(f"synthetic scene size {shape} is too small (at least 8x8 pixels)")
    land_rng, optical_rng, date_rng, cloud_rng, sar_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 12]).spawn(5)
    )
    if acquisition is not None:  # another date: its own radiometric change and clouds, the same ground
        date_rng, cloud_rng = (np.random.default_rng(s) for s in
                               np.random.SeedSequence([int(seed), 13, int(acquisition)]).spawn(2))
    cover = _land_cover(land_rng, shape, season)
    ground = _ground_spectra(optical_rng, cover)
    # The cloudy acquisition is another date: small per-band radiometric change and fresh sensor noise.
    gain = date_rng.uniform(0.96, 1.04, size=13).astype(np.float32)
    other_date = ground * gain * (1.0 + 0.01 * date_rng.standard_normal(shape, np.float32))[..., None]
    thick, thin, shadow = _clouds(cloud_rng, shape, cloud_cover)
    cloudy = other_date * (1.0 - 0.65 * shadow)[..., None]
    cloudy = cloudy * (1.0 - thick)[..., None] + _THICK_CLOUD * thick[..., None]
    cloudy = cloudy * (1.0 - 0.7 * thin)[..., None] + _THIN_CLOUD * thin[..., None]
    return dict(
        s1=_sar(sar_rng, cover),
        s2=_to_dn(ground),
        s2_cloudy=_to_dn(cloudy),
        land_cover=cover,
        thick=thick,
        thin=thin,
        shadow=shadow,
    )


def _utm_crs(roi: int) -> CRS:
    return CRS.from_epsg(32600 + 1 + (roi * 7) % 60)


def _north_up(west: float, north: float) -> Affine:
    """Geotransform of a north-up raster with 10 m pixels whose top-left corner is (west, north)."""
    return Affine(10.0, 0.0, west, 0.0, -10.0, north)


def _write(path: Path, array: np.ndarray, crs: CRS, transform) -> None:
    """Writes (H, W, C) `array` as an uncompressed, pixel-interleaved GeoTIFF (as SEN12MS-CR files are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, count = array.shape
    profile = dict(
        driver="GTiff",
        dtype=array.dtype.name,
        count=count,
        height=height,
        width=width,
        crs=crs,
        transform=transform,
        interleave="pixel",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(np.moveaxis(array, -1, 0)))


def triplet_paths(root: str | Path, season: str, roi: int, patch: int) -> dict[str, Path]:
    """Paths of the s1, s2 and s2_cloudy GeoTIFFs of one patch in the official SEN12MS-CR layout."""
    root = Path(root)
    return {
        kind: root / f"{season}_{kind}" / f"{kind}_{roi}" / f"{season}_{kind}_{roi}_p{patch}.tif"
        for kind in ("s1", "s2", "s2_cloudy")
    }


def write_synthetic_dataset(
    root: str | Path,
    n_scenes: int = 32,
    size: int = 256,
    seed: int = 0,
    layout: Sequence[tuple[str, int]] | None = None,
) -> list[str]:
    """Writes `n_scenes` synthetic triplets under `root` in the SEN12MS-CR layout; returns their ids in order.

    `layout` gives the (season, roi) of each scene (cycled when shorter than `n_scenes`); by default 6 of
    every 8 scenes go to train ROIs, one to a test ROI (spring s1_106, fall s1_139) and one to a validation
    ROI (winter s1_22, summer s1_19). Patches of one ROI are neighbouring tiles of one UTM grid (10 m pixels).
    Ids look like `ROIs1158_spring_106_p30`. Files are overwritten; identical seeds give identical files.
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be positive, got {n_scenes}")
    layout = list(layout) if layout else default_layout(n_scenes)
    ids, patches_in_roi = [], {}
    for i in range(n_scenes):
        season, roi = layout[i % len(layout)]
        k = patches_in_roi.get((season, roi), 0)
        patches_in_roi[(season, roi)] = k + 1
        patch = 30 + 7 * k
        scene = synthetic_scene(size, seed=int(seed) * 1_000_003 + i, season=season)
        crs = _utm_crs(roi)
        x0 = 300_000.0 + 10.0 * size * (k % 8) + 997.0 * roi
        y0 = 5_000_000.0 - 10.0 * size * (k // 8) - 1009.0 * roi
        transform = _north_up(x0, y0)
        for kind, path in triplet_paths(root, season, roi, patch).items():
            _write(path, scene[kind], crs, transform)
        ids.append(f"{season}_{roi}_p{patch}")
    return ids


def write_synthetic_scene(
    directory: str | Path, height: int, width: int, seed: int = 0, cloud_cover: float | None = 0.4
) -> dict[str, Path]:
    """Writes one big synthetic scene (s1.tif, s2.tif, s2_cloudy.tif) for prediction demos; returns the paths.

    Same bands, dtypes, UTM CRS and 10 m transform as SEN12MS-CR patches, any `height` x `width`.
    """
    directory = Path(directory)
    scene = synthetic_scene((height, width), seed=seed, cloud_cover=cloud_cover)
    crs, transform = _utm_crs(31), _north_up(500_000.0, 4_000_000.0)
    paths = synthetic_scene_paths(directory)
    for kind, path in paths.items():
        _write(path, scene[kind], crs, transform)
    return paths


def synthetic_scene_paths(directory: str | Path) -> dict[str, Path]:
    """Where `write_synthetic_scene` writes (or wrote) the scene's files in `directory`."""
    return {kind: Path(directory) / f"{kind}.tif" for kind in ("s1", "s2", "s2_cloudy")}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="output folder (SEN12MS-CR layout)")
    parser.add_argument("--n", type=int, default=32, help="number of scenes")
    parser.add_argument("--size", type=int, default=256, help="patch size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ids = write_synthetic_dataset(args.root, n_scenes=args.n, size=args.size, seed=args.seed)
    print(f"wrote {len(ids)} synthetic triplets under {args.root}")


if __name__ == "__main__":
    main()
