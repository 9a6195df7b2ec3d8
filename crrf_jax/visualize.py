"""Pictures of results: true-colour Sentinel-2, false-colour SAR, uncertainty, and labelled grids as PNG."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

from crrf_jax import paths

# Fixed display stretch for L1C reflectance in [0, 1] (DN / 10000): 0.3 reflectance is white. A fixed stretch
# keeps cloudy input, prediction and target comparable, which a per-image percentile stretch would not.
S2_DISPLAY_MAX = 0.3


def s2_rgb(s2: np.ndarray, rgb_idx: tuple[int, int, int]) -> np.ndarray:
    """(H, W, C) reflectance in [0, 1] -> (H, W, 3) uint8 true colour (bands `rgb_idx`, e.g. B04, B03, B02)."""
    x = np.asarray(s2, np.float32)[..., list(rgb_idx)] / S2_DISPLAY_MAX
    return (np.clip(x, 0.0, 1.0) ** (1 / 1.6) * 255).astype(np.uint8)


def sar_rgb(s1: np.ndarray) -> np.ndarray:
    """(H, W, 2) normalised SAR (VV, VH in [0, 1]) -> (H, W, 3) uint8 false colour (VV, VH, VV - VH)."""
    s1 = np.asarray(s1, np.float32)
    vv, vh = s1[..., 0], s1[..., 1]
    x = np.stack([vv, vh, np.clip(vv - vh + 0.5, 0, 1)], -1)
    return (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def heat(x: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(H, W) or (H, W, 1) non-negative map -> (H, W, 3) uint8 (black -> red -> yellow -> white)."""
    x = np.asarray(x, np.float32).squeeze()
    vmax = float(np.max(x)) if vmax is None else vmax
    u = np.clip(x / max(vmax, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * u, 0, 1), np.clip(3 * u - 1, 0, 1), np.clip(3 * u - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], row_labels=None, col_labels=None, pad: int = 2) -> np.ndarray:
    """Tiles equally sized (H, W, 3) uint8 images into one picture with optional text labels."""
    h, w = rows[0][0].shape[:2]
    top = 12 if col_labels else 0
    left = 0
    n_cols = max(len(r) for r in rows)
    out = np.full((top + len(rows) * (h + pad), left + n_cols * (w + pad), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = top + i * (h + pad), left + j * (w + pad)
            out[y : y + h, x : x + w] = img
    if col_labels or row_labels:
        pil = Image.fromarray(out)
        draw = ImageDraw.Draw(pil)
        for j, label in enumerate(col_labels or []):
            draw.text((left + j * (w + pad) + 2, 0), str(label), fill=(0, 0, 0))
        for i, label in enumerate(row_labels or []):
            draw.text((2, top + i * (h + pad) + 2), str(label), fill=(255, 255, 0))
        out = np.asarray(pil)
    return out


def save_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Writes an (H, W, 3) uint8 image as a PNG at `path` (local or a gs:// URL); returns the path."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return os.fspath(paths.write_bytes(path, buffer.getvalue()))
