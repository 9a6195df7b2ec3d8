"""CUHK-CR1 and CUHK-CR2 on disk: layout, the published train/test splits, validated PNG reading, synthetic copies.

CUHK-CR (Sui et al., "Diffusion Enhancement for Cloud Removal in Ultra-Resolution Remote Sensing Imagery",
IEEE TGRS 62, 2024) pairs cloudy and cloud-free very-high-resolution 4-band images: CUHK-CR1 has thin clouds,
CUHK-CR2 thick clouds. EMRDM (CVPR 2025) trains and reports on both. One reader serves the two variants.

Sources (read, not copied):

- layout and the NIR side tree: the dataset README (github.com/littlebeen/DDPM-Enhancement-for-Cloud-Removal,
  README.md: the download holds ``CUHK-CR1``, ``CUHK-CR2`` and ``nir``; "load the images in the RGB dataset and
  the nir dataset and combine the 4 channels together") and EMRDM's configs (github.com/Ly403/EMRDM,
  configs/example_training/cuhk.yaml and cuhkv2.yaml: ``datasets_dir: .../C-CUHK/CUHK-CR1``,
  ``nir_datasets_dir: .../C-CUHK/nir/CUHK-CR1``);
- folders, channel use and scaling: EMRDM's loader (github.com/Ly403/EMRDM, sgm/data/cuhk/image_datasets.py,
  itself from github.com/littlebeen/Cloud-removal-model-collection, dataload/My.py): ``<split>/label`` (clear)
  and ``<split>/cloud`` (cloudy), RGB from the RGB tree, channel 0 of the NIR tree's image appended as the 4th
  band, values divided by 255 (then mapped to [-1, 1], which is ``contract.to_model`` of ours);
- splits: the folders themselves (``train`` and ``test``; there is no validation folder). The split sizes in
  `SPLIT_COUNTS` are those reported by independent reproductions found in the public code index (data notes
  giving "CR1 534 train / 134 test and CR2 448 train / 111 test"; two of them agree). They are not checked
  against the archive or the dataset paper here: treat them as the expected sizes, not as ground truth.

Layout (``root`` is the extracted archive, EMRDM's ``C-CUHK``)::

    <root>/CUHK-CR1/{train,test}/{cloud,label}/<name>.png        RGB, 8-bit, 3 channels
    <root>/nir/CUHK-CR1/{train,test}/{cloud,label}/<name>.png    NIR, 8-bit, grey or 3 channels (channel 0 used)
    <root>/CUHK-CR2/...  and  <root>/nir/CUHK-CR2/...            the same for CUHK-CR2

``nir_root`` overrides ``<root>/nir``. The split rule is exact and structural: a split's samples are the
``*.png`` names of its four folders (RGB label, RGB cloud, NIR label, NIR cloud), listed in sorted (byte-wise
string) order, the order EMRDM's ``sorted(os.listdir(...))`` gives ("10.png" before "2.png"). The four folders
must hold the same names: a name missing from one of them is a missing partner (DataError naming the missing
file). Other files are ignored.

A sample (the keys of ``contract``; there is no SAR, so no ``s1``):

| key         | shape     | dtype   | range  | meaning                                                        |
| ----------- | --------- | ------- | ------ | -------------------------------------------------------------- |
| `s2`        | (H, W, C) | float32 | [0, 1] | the clear (``label``) image, 8-bit value / 255                 |
| `s2_cloudy` | (H, W, C) | float32 | [0, 1] | the cloudy (``cloud``) image, 8-bit value / 255                |
| `id`        | ()        | str     |        | "<variant>/<split>/<stem>", e.g. "CR1/test/17"                 |

C is the number of selected bands, by default all 4 of `BANDS` (R, G, B, NIR) in that order. The keys keep
the repository's names although the images are not Sentinel-2: the networks see any [0, 1] optical image the
same way. The images are read at their stored size (512 x 512 in the archive).

Known ambiguities and departures from EMRDM, stated so that results can be compared:

- no validation split: EMRDM's ``validation`` and ``test`` datasets are both the ``test`` folder, so its
  checkpoint monitor ("RMSE", configs above) selects on the test set. Hold out part of ``train`` for
  validation to avoid that leak; this module offers only the published folders.
- EMRDM halves every image (``imresize(x, 1/2)``, MATLAB-style antialiased bicubic, so 256 x 256) before
  training and testing, and its metrics are on the halved images. This reader returns full resolution;
  resampling belongs to the pipeline.
- EMRDM pairs NIR files with RGB files by their position in the two sorted listings (it only asserts equal
  counts), the dataset authors' own loaders by file name. This reader pairs by name and refuses unequal sets,
  so a renamed file cannot silently shift every later pair.
- EMRDM reads NIR PNGs as multi-channel images and keeps channel 0; a grey (1-channel) NIR PNG is accepted too.
- EMRDM's cloud mask ``M = clip(sum(label - cloud), 0, 1)`` is a training detail of its loss, not data; it is
  not produced here.

Errors: every bad file raises `contract.DataError` naming it: a missing partner, a file that is not a
readable PNG (wrong signature, truncated, corrupt), a bit depth other than 8, a channel count other than 3
(RGB) or 1/3 (NIR), or a size that differs from the sample's label image.

`write_synthetic_cuhk_cr` writes a small copy of the layout with plausible content (the land, clouds and
spectra of `crrf_jax.data.synthetic.synthetic_scene`, scaled to 8 bits) for tests and demos.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crrf_jax.data.contract import DataError
from crrf_jax.data.sen12mscr import BadSampleLog
from crrf_jax.data.synthetic import synthetic_scene

logger = logging.getLogger(__name__)

VARIANTS = ("CR1", "CR2")  # CUHK-CR1: thin clouds; CUHK-CR2: thick clouds
SPLITS = ("train", "test", "all")  # "all": train then test
BANDS = ("R", "G", "B", "NIR")
PIXEL_MAX = 255.0  # 8-bit images; value / 255 -> [0, 1] (EMRDM: x / 255 * 2 - 1, i.e. to_model of this)
IMAGE_SUFFIX = ".png"
NIR_DIR = "nir"

# Published split sizes (see the module docstring for the source).
SPLIT_COUNTS: dict[str, dict[str, int]] = {
    "CR1": {"train": 534, "test": 134},
    "CR2": {"train": 448, "test": 111},
}

_SPLIT_DIRS = ("train", "test")
_ROLES = ("label", "cloud", "nir_label", "nir_cloud")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> channels (3: palette)
_PNG_COLOUR = {0: "grey", 2: "RGB", 3: "palette", 4: "grey + alpha", 6: "RGBA"}


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# -------------------------------------------------------------------------------------------- layout & splits


@dataclasses.dataclass(frozen=True)
class CuhkPair:
    """One CUHK-CR sample: the clear and cloudy RGB PNGs and their NIR partners.

    id: "<variant>/<split>/<stem>", e.g. "CR1/test/17"; name: the file name shared by the four files.
    """

    id: str
    variant: str
    split: str
    name: str
    label: Path
    cloud: Path
    nir_label: Path
    nir_cloud: Path


def variant_dirs(
    root: str | os.PathLike, variant: str, nir_root: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """(RGB folder, NIR folder) of a variant: ``<root>/CUHK-CR1`` and ``<nir_root or root/nir>/CUHK-CR1``."""
    _check_choice("variant", variant, VARIANTS)
    folder = f"CUHK-{variant}"
    nir_base = Path(nir_root) if nir_root is not None else Path(root) / NIR_DIR
    return Path(root) / folder, nir_base / folder


def make_pair(
    root: str | os.PathLike,
    variant: str,
    split: str,
    name: str,
    nir_root: str | os.PathLike | None = None,
) -> CuhkPair:
    """The CuhkPair of file `name` (e.g. "17.png") in `split` ("train"/"test"), whether or not its files exist."""
    _check_choice("split", split, _SPLIT_DIRS)
    rgb, nir = variant_dirs(root, variant, nir_root)
    return CuhkPair(
        id=f"{variant}/{split}/{Path(name).stem}",
        variant=variant,
        split=split,
        name=name,
        label=rgb / split / "label" / name,
        cloud=rgb / split / "cloud" / name,
        nir_label=nir / split / "label" / name,
        nir_cloud=nir / split / "cloud" / name,
    )


def _png_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_SUFFIX) and e.is_file()}


def _list_split(
    root: Path, variant: str, split: str, nir_root, on_error: str, bad_samples: BadSampleLog | None
) -> list[CuhkPair]:
    """The complete pairs of one split folder, by name; a name absent from one of the four folders is a
    missing partner (raised or recorded)."""
    probe = make_pair(root, variant, split, "x.png", nir_root)
    folders = {role: getattr(probe, role).parent for role in _ROLES}
    names = {role: _png_names(folder) for role, folder in folders.items()}
    pairs = []
    for name in sorted(set().union(*names.values())):
        pair = make_pair(root, variant, split, name, nir_root)
        missing = [role for role in _ROLES if name not in names[role]]
        if not missing:
            pairs.append(pair)
            continue
        present = next(getattr(pair, role) for role in _ROLES if role not in missing)
        err = DataError(getattr(pair, missing[0]), f"missing partner file of {present} (sample {pair.id})")
        if on_error == "raise":
            raise err
        (bad_samples if bad_samples is not None else BadSampleLog()).record(pair.id, err)
    return pairs


def find_pairs(
    root: str | os.PathLike,
    variant: str,
    split: str = "all",
    *,
    nir_root: str | os.PathLike | None = None,
    on_error: str = "raise",
    bad_samples: BadSampleLog | None = None,
) -> list[CuhkPair]:
    """All samples of `split` ("train", "test" or "all": train then test) of `variant` ("CR1"/"CR2").

    Opens no file. Each split is sorted by file name. A missing partner raises DataError naming the missing
    file (``on_error="skip"``: the sample is dropped and recorded in `bad_samples`). Raises FileNotFoundError
    when the variant's folder or a requested split's label folder does not exist, ValueError when the
    selection holds no sample. Split sizes other than `SPLIT_COUNTS` are logged (a partial copy).
    """
    _check_choice("variant", variant, VARIANTS)
    _check_choice("split", split, SPLITS)
    _check_choice("on_error", on_error, ("raise", "skip"))
    root = Path(root)
    rgb, nir = variant_dirs(root, variant, nir_root)
    for folder in (rgb, nir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: CUHK-{variant} folder does not exist (layout: see crrf_jax.data."
                                    f"cuhk_cr; expected {rgb}/<train|test>/<cloud|label>/*.png and the same "
                                    f"under {nir})")
    splits = _SPLIT_DIRS if split == "all" else (split,)
    present = [s for s in splits if (rgb / s / "label").is_dir()]
    if split != "all" and not present:
        raise FileNotFoundError(f"{rgb / split / 'label'}: split folder of CUHK-{variant} does not exist")
    pairs = []
    for s in present:
        found = _list_split(root, variant, s, nir_root, on_error, bad_samples)
        if len(found) != SPLIT_COUNTS[variant][s]:
            logger.info("%s: %d samples in %s, the published split has %d", rgb, len(found), s,
                        SPLIT_COUNTS[variant][s])
        pairs += found
    if not pairs:
        raise ValueError(f"{rgb}: no CUHK-{variant} sample in split {split!r}; expected e.g. "
                         f"{rgb}/test/label/1.png with partners in cloud/ and {nir}/test/")
    return pairs


def split_counts(pairs: Sequence[CuhkPair]) -> dict[str, int]:
    """{split: number of samples} of a list of pairs, e.g. to compare with `SPLIT_COUNTS`."""
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.split] = counts.get(pair.split, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------- reading


def _png_header(path: Path, what: str) -> tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk; DataError naming path otherwise."""
    if not path.is_file():
        raise DataError(path, f"{what} file does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError as e:
        raise DataError(path, f"cannot read {what} ({e})") from e
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(path, f"{what} is not a PNG file (no PNG signature and header)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return height, width, depth, colour


def read_png(path: str | os.PathLike, what: str, channels: Sequence[int]) -> np.ndarray:
    """An 8-bit PNG as uint8 (H, W, C), checked: C must be one of `channels` (palette and alpha images are
    refused). Raises DataError naming `path` (missing, not a PNG, not 8-bit, wrong channels, undecodable)."""
    path = Path(path)
    _, _, depth, colour = _png_header(path, what)
    if depth != 8:
        raise DataError(path, f"{what} must be an 8-bit PNG, found {depth}-bit")
    count = _PNG_CHANNELS.get(colour)
    if colour == 3 or count not in channels:
        kind = _PNG_COLOUR.get(colour, f"colour type {colour}")
        wanted = " or ".join(str(c) for c in channels)
        raise DataError(path, f"{what} must have {wanted} channels, found {count} ({kind})")
    try:
        with Image.open(path) as img:
            img.load()
            data = np.asarray(img)
    except (OSError, SyntaxError, ValueError, zlib.error) as e:
        raise DataError(path, f"cannot decode {what} PNG, file truncated or corrupt? ({e})") from e
    return data[..., None] if data.ndim == 2 else data


def resolve_cuhk_bands(bands: None | str | Sequence[str] = None) -> tuple[int, ...]:
    """Band names -> indices into `BANDS` (R, G, B, NIR), in the given order. None or "all": all 4; "rgb":
    R, G, B; or a sequence / comma-separated string of names (case-insensitive). ValueError otherwise."""
    if bands is None or (isinstance(bands, str) and bands.strip().lower() in ("", "all")):
        return tuple(range(len(BANDS)))
    if isinstance(bands, str):
        bands = BANDS[:3] if bands.strip().lower() == "rgb" else [b for b in bands.split(",") if b.strip()]
    out = []
    for band in bands:
        name = str(band).strip().upper()
        if name not in BANDS:
            raise ValueError(f"unknown CUHK-CR band {band!r}; valid names: {', '.join(BANDS)}")
        if BANDS.index(name) in out:
            raise ValueError(f"band {name} selected twice in {list(bands)!r}")
        out.append(BANDS.index(name))
    if not out:
        raise ValueError("empty band selection")
    return tuple(out)


def _read_image(rgb_path: Path, nir_path: Path, what: str, label: tuple[Path, np.ndarray] | None) -> np.ndarray:
    """RGB + channel 0 of NIR as uint8 (H, W, 4); both of the size of `label` (path, pixels), the sample's
    clear image (None: this is it, the RGB file sets the size)."""
    rgb = read_png(rgb_path, f"{what} RGB image", (3,))
    nir = read_png(nir_path, f"{what} NIR image", (1, 3))
    label_path, size = (rgb_path, rgb.shape[:2]) if label is None else (label[0], label[1].shape[:2])
    for path, data in ((rgb_path, rgb), (nir_path, nir)):
        if data.shape[:2] != size:
            raise DataError(path, f"size {data.shape[0]}x{data.shape[1]} differs from the "
                                  f"{size[0]}x{size[1]} of the sample's clear image {label_path}")
    return np.concatenate([rgb, nir[..., :1]], axis=-1)


def read_pair(pair: CuhkPair, bands: None | str | Sequence[str] = None) -> dict[str, Any]:
    """Read and validate one sample.

    Returns {"s2": clear (H, W, C), "s2_cloudy": cloudy (H, W, C), float32 in [0, 1] (8-bit / 255), "id"};
    C follows `bands` (see `resolve_cuhk_bands`; default R, G, B, NIR). Raises DataError naming the bad file.
    """
    index = list(resolve_cuhk_bands(bands))
    clear = _read_image(pair.label, pair.nir_label, "clear", None)
    cloudy = _read_image(pair.cloud, pair.nir_cloud, "cloudy", (pair.label, clear))
    return {
        "s2": clear[..., index].astype(np.float32) / np.float32(PIXEL_MAX),
        "s2_cloudy": cloudy[..., index].astype(np.float32) / np.float32(PIXEL_MAX),
        "id": pair.id,
    }


def read_pair_or_none(
    pair: CuhkPair,
    bands: None | str | Sequence[str] = None,
    *,
    on_error: str = "raise",
    bad_samples: BadSampleLog | None = None,
) -> dict[str, Any] | None:
    """`read_pair`; with ``on_error="skip"`` a DataError returns None and is recorded in `bad_samples`."""
    _check_choice("on_error", on_error, ("raise", "skip"))
    try:
        return read_pair(pair, bands)
    except DataError as err:
        if on_error == "raise":
            raise
        (bad_samples if bad_samples is not None else BadSampleLog()).record(pair.id, err)
        return None


# -------------------------------------------------------------------------------------------------- synthetic

# 8-bit display scaling of the synthetic L1C digital numbers: DN * 255 / 5000, clipped (clouds saturate, as
# they do in the 8-bit archive). Bands of `synthetic_scene` (file order B01..B12) used as R, G, B, NIR.
_DISPLAY_DN = 5000.0
_SCENE_BANDS = (3, 2, 1, 7)  # B04, B03, B02, B08
_CLOUD_COVER = {"CR1": 0.08, "CR2": 0.5}  # thin clouds mostly (CR1), large thick clouds (CR2)
DEFAULT_SYNTHETIC_COUNTS = {"train": 3, "test": 2}


def synthetic_cuhk_pair(size: int = 32, seed: int = 0, variant: str = "CR1") -> dict[str, np.ndarray]:
    """One synthetic sample as uint8 (H, W, 4) R, G, B, NIR arrays: {"label": clear, "cloud": cloudy}."""
    _check_choice("variant", variant, VARIANTS)
    scene = synthetic_scene(size, seed=seed, cloud_cover=_CLOUD_COVER[variant])

    def to_8bit(dn: np.ndarray) -> np.ndarray:
        scaled = dn[..., list(_SCENE_BANDS)].astype(np.float32) * (PIXEL_MAX / _DISPLAY_DN)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

    return {"label": to_8bit(scene["s2"]), "cloud": to_8bit(scene["s2_cloudy"])}


def _write_png(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(path, format="PNG", compress_level=1)


def write_synthetic_cuhk_cr(
    root: str | os.PathLike,
    variant: str = "CR1",
    counts: Mapping[str, int] | None = None,
    size: int = 32,
    seed: int = 0,
    *,
    nir_channels: int = 3,
) -> list[str]:
    """Writes a synthetic CUHK-`variant` under `root` in the archive's layout; returns the ids in write order.

    counts: {"train": n, "test": m} (default `DEFAULT_SYNTHETIC_COUNTS`; `SPLIT_COUNTS[variant]` gives a copy
    of the published sizes). Files are named "1.png", "2.png", ... per split; sample i in write order (train
    then test) is ``synthetic_cuhk_pair(size, seed * 1_000_003 + i, variant)``. NIR files repeat the NIR band
    in 3 channels like the archive's (``nir_channels=1``: grey PNGs). Existing files are overwritten.
    """
    _check_choice("variant", variant, VARIANTS)
    if nir_channels not in (1, 3):
        raise ValueError(f"nir_channels must be 1 or 3, got {nir_channels}")
    counts = dict(DEFAULT_SYNTHETIC_COUNTS if counts is None else counts)
    unknown = set(counts) - set(_SPLIT_DIRS)
    if unknown or any(n < 0 for n in counts.values()):
        raise ValueError(f"counts must map train/test to non-negative numbers, got {counts}")
    ids, i = [], 0
    for split in _SPLIT_DIRS:
        for k in range(counts.get(split, 0)):
            pair = make_pair(root, variant, split, f"{k + 1}{IMAGE_SUFFIX}")
            arrays = synthetic_cuhk_pair(size, seed=int(seed) * 1_000_003 + i, variant=variant)
            for kind in ("label", "cloud"):
                image = arrays[kind]
                nir = np.repeat(image[..., 3:], 3, axis=-1) if nir_channels == 3 else image[..., 3]
                _write_png(getattr(pair, kind), np.ascontiguousarray(image[..., :3]))
                _write_png(getattr(pair, f"nir_{kind}"), np.ascontiguousarray(nir))
            ids.append(pair.id)
            i += 1
    return ids
