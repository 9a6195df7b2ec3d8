"""Sen2_MTC_New on disk: tile splits, three cloudy dates per clear target, validated TIFF reading.

Sen2_MTC_New is the multi-temporal Sentinel-2 set collected by the CTGAN authors (Huang & Wu, ICIP 2022) and
used by DiffCR and EMRDM (CVPR 2025) as "Sen2_MTC_New". Each sample is three cloudy acquisitions of a
256 x 256 patch and one cloud-free acquisition of it; every image has 4 bands, R, G, B, NIR (Sentinel-2 B04,
B03, B02, B08), as digital numbers in [0, 10000] (reflectance x 10000). No SAR.

Where this comes from (read, not copied):

- layout, the 3-to-1 pairing and the scaling: EMRDM ``sgm/data/sen2_mtc_new/sen2_mtc_new.py``
  (github.com/Ly403/EMRDM, class ``Sen2_MTC_New_Multi``), itself based on CTGAN ``dataset.py``
  (github.com/come880412/CTGAN, class ``Sen2_MTC``); band meaning and value range: CTGAN ``README.md``;
  EMRDM's visualisation (``sgm/util.py``, ``sen_mtc_scale_01``) takes channels 0, 1, 2 as R, G, B;
- how the split lists were made: CTGAN ``train_val_split.py`` (a seeded random 70/10/20 % split of the tile
  folders, keeping only names that start with "T"); the lists themselves ship inside the dataset archive
  (``CTGAN.zip``) as ``train.txt``, ``val.txt``, ``test.txt``;
- split sizes and the val/test tiles: GeoCR ``splits/README.md`` and ``splits/Sen2_MTC_New/splits/*.txt``
  (github.com/KAIST-VICLab/GeoCR), which list every sample of the official tile split: 2,380 / 350 / 687.

Layout (``<tile>`` e.g. ``T12TUR_R027``, ``<k>`` the image number within the tile, 0, 1, 2, ...)::

    <root>/train.txt, val.txt, test.txt                     tile names, one per line
    <root>/Sen2_MTC/<tile>/cloudless/<tile>_<k>.tif          the clear target, (256, 256, 4)
    <root>/Sen2_MTC/<tile>/cloud/<tile>_<k>_<j>.tif          cloudy date j = 0, 1, 2 of the same patch

Samples and order. Each ``.tif`` of a listed tile's ``cloudless`` folder is one sample (as in EMRDM); its id is
the file's stem, ``<tile>_<k>``. EMRDM enumerates samples in ``os.listdir`` order, which depends on the file
system; ``find_samples`` orders them by tile in the order of the split file, then by ``k`` numerically (names
not of the form ``<tile>_<k>`` sort after, by name). Tiles hold different numbers of images: most 70, but the
published test tiles include T31TBG_R051 with 56 and T41UNR_R020 with 71 (``TEST_TILES``).

Dates. The files carry no acquisition dates: the only temporal index is the suffix ``_0``, ``_1``, ``_2``, and
EMRDM and CTGAN stack the cloudy images in that order. ``read_sample`` returns them in that order as
``s2_cloudy`` (T=3, H, W, C). Whether the suffixes are chronological is not documented by the dataset authors
(an ambiguity, not something this reader can check). What it does check: every target has exactly the dates
0, 1, 2 (a missing one is a missing partner; an extra index, e.g. ``_3``, or a non-canonical one, e.g.
``_01``, is an error naming that file).

Scaling. Pixels are clipped to [0, 10000] and divided by 10000 (``contract.normalize_s2``): float32 on [0, 1].
EMRDM divides by 10000 and maps to [-1, 1] (mean 0.5, std 0.5) without clipping, i.e. ``contract.to_model``
of our values for every pixel inside [0, 10000]; its ``sen_mtc_scale_01`` clamps outputs to [0, 10000] when
mapping them back.
EMRDM's target (``gt_image``) is the clear image's R, G, B only while its condition keeps all 4 bands of the
cloudy dates; here ``bands`` selects the same channels of target and inputs (default all 4; ``"rgb"`` gives
EMRDM's target channels), and callers that need EMRDM's exact inputs read with the default and slice.

Splits and leaks. The split is by tile and the published lists are tile-disjoint; ``find_samples`` rejects a
tile listed twice in one split file, and ``split_tiles`` lets callers check disjointness across files. Known
leak elsewhere: GeoCR finds 104 Sen2_MTC_Old samples on Sen2_MTC_New test tiles, so training on Sen2_MTC_Old
and testing on this set is not clean. The dataset's README speaks of 50 tiles of 70 images; the published val
and test lists hold 5 and 10 tiles, and 2,380 train samples would be 34 tiles of 70 (not checked: we have not
seen the train tile list), 49 in all. The split script drops folders whose name does not start with "T",
which may account for the difference.

Validation. Every problem with a file raises ``DataError`` whose message starts with that file's path: a
missing split file, tile folder or partner, an unexpected date index, a file that is not a readable TIFF, a
wrong band count (4), a wrong dtype (uint16, int16, float32 or float64), a cloudy date off the clear
target's grid (``contract.check_same_grid``: size, CRS when both have one, transform), and NaN/Inf pixels.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from crrf_jax.data.contract import GDAL_ENV, DataError, normalize_s2, open_geotiff
from crrf_jax.data.sen12mscr import BadSampleLog

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BANDS = ("B04", "B03", "B02", "B08")  # file order: R, G, B, NIR
RGB = (0, 1, 2)
N_DATES = 3
DTYPES = ("uint16", "int16", "float32", "float64")
DATA_DIR = "Sen2_MTC"

# Samples per split of the official tile split (GeoCR splits/README.md, "Official tile split").
PUBLISHED_SPLIT_SIZES = {"train": 2380, "val": 350, "test": 687}
# Tiles and their image counts of the published val and test lists (GeoCR splits/Sen2_MTC_New/splits/).
VAL_TILES = {"T22MCT_R024": 70, "T34TDT_R036": 70, "T39VIF_R078": 70, "T43UGQ_R048": 70, "T60KWF_R072": 70}
TEST_TILES = {
    "T12TUR_R027": 70, "T15UVU_R012": 70, "T31TBG_R051": 56, "T33VXG_R022": 70, "T41UNR_R020": 71,
    "T41VMJ_R006": 70, "T46TEL_R033": 70, "T50JML_R060": 70, "T54HTJ_R102": 70, "T56JMQ_R030": 70,
}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One Sen2_MTC_New sample: the clear target and its cloudy dates, in date-index order.

    id: the target's stem, "<tile>_<k>", e.g. "T12TUR_R027_5"; tile: e.g. "T12TUR_R027".
    """

    id: str
    tile: str
    s2: Path
    s2_cloudy: tuple[Path, ...]


def sample_paths(root: str | os.PathLike, tile: str, name: str) -> Sample:
    """The Sample of target `name` (a file stem) in `tile` under root, whether or not its files exist."""
    tile_dir = Path(root) / DATA_DIR / tile
    cloudy = tuple(tile_dir / "cloud" / f"{name}_{j}.tif" for j in range(N_DATES))
    return Sample(id=name, tile=tile, s2=tile_dir / "cloudless" / f"{name}.tif", s2_cloudy=cloudy)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def split_tiles(root: str | os.PathLike, split: str) -> list[str]:
    """The tiles of `split` as listed in ``<root>/<split>.txt`` (whitespace-separated names), in file order.

    DataError naming the file when it is missing, empty, or names a tile twice.
    """
    _check_choice("split", split, SPLITS)
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise DataError(path, f"split list of {split!r} does not exist (it ships with Sen2_MTC_New as {split}.txt)")
    tiles = path.read_text().split()
    if not tiles:
        raise DataError(path, "split list names no tile")
    seen = set()
    for tile in tiles:
        if tile in seen:
            raise DataError(path, f"tile {tile} is listed twice")
        seen.add(tile)
    return tiles


def _image_key(tile: str, name: str) -> tuple[int, int, str]:
    m = re.fullmatch(rf"{re.escape(tile)}_(\d+)", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def _tif_stems(folder: Path) -> list[str]:
    stems = []
    for name in os.listdir(folder):
        if name.endswith(".tif"):
            stems.append(name[: -len(".tif")])
        else:
            logger.debug("ignoring %s (not a .tif)", folder / name)
    return stems


def _cloud_dates(cloud_dir: Path) -> dict[str, dict[str, Path]]:
    """target stem -> {date suffix as written: path} for the cloudy files of one tile."""
    dates: dict[str, dict[str, Path]] = {}
    if not cloud_dir.is_dir():
        return dates
    for stem in _tif_stems(cloud_dir):
        m = re.fullmatch(r"(.+)_(\d+)", stem)
        if m:
            dates.setdefault(m.group(1), {})[m.group(2)] = cloud_dir / f"{stem}.tif"
    return dates


def _check_dates(sample: Sample, found: dict[str, Path]) -> None:
    """DataError for a missing cloudy date, or an extra or non-canonical date index, of one sample."""
    expected = {str(j) for j in range(N_DATES)}
    for suffix, path in sorted(found.items()):
        if suffix not in expected:
            raise DataError(path, f"unexpected date index _{suffix} for target {sample.s2}: Sen2_MTC_New has "
                                  f"exactly {N_DATES} cloudy dates per target, _0 to _{N_DATES - 1}")
    for j, path in enumerate(sample.s2_cloudy):
        if str(j) not in found:
            raise DataError(path, f"missing cloudy date {j} (partner of {sample.s2})")


def _tile_samples(root: Path, tile: str, split_file: Path) -> list[tuple[Sample, DataError | None]]:
    clear_dir = root / DATA_DIR / tile / "cloudless"
    if not clear_dir.is_dir():
        raise DataError(clear_dir, f"folder of tile {tile} (listed in {split_file}) does not exist")
    dates = _cloud_dates(root / DATA_DIR / tile / "cloud")
    out = []
    for name in sorted(_tif_stems(clear_dir), key=lambda n: _image_key(tile, n)):
        sample = sample_paths(root, tile, name)
        try:
            _check_dates(sample, dates.get(name, {}))
            out.append((sample, None))
        except DataError as err:
            out.append((sample, err))
    return out


def find_samples(
    root: str | os.PathLike,
    split: str,
    *,
    on_error: str = "raise",
    bad_samples: BadSampleLog | None = None,
) -> list[Sample]:
    """All samples of `split` under root: tiles in split-file order, images by number. Opens no image.

    The split rule is the dataset's own: the samples of a split are all targets in the ``cloudless`` folders
    of the tiles its ``<split>.txt`` lists. A missing cloudy date or an unexpected date index raises DataError
    naming the file (``on_error="skip"``: the sample is dropped and recorded in ``bad_samples``). A missing
    split file or tile folder always raises; FileNotFoundError when root does not exist, ValueError when the
    split's tiles hold no target.
    """
    _check_choice("on_error", on_error, ("raise", "skip"))
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Sen2_MTC_New root directory does not exist")
    split_file = root / f"{split}.txt"
    samples = []
    for tile in split_tiles(root, split):
        for sample, err in _tile_samples(root, tile, split_file):
            if err is None:
                samples.append(sample)
            elif on_error == "raise":
                raise err
            else:
                (bad_samples if bad_samples is not None else BadSampleLog()).record(sample.id, err)
    if not samples:
        raise ValueError(f"{split_file}: the tiles of split {split!r} hold no target under {root / DATA_DIR}")
    return samples


# ---------------------------------------------------------------------------------------------------- reading


def resolve_bands(spec: None | str | Sequence[int | str] = None) -> tuple[int, ...]:
    """Band selection -> 0-based channel indices: None/"all" all 4 (R, G, B, NIR), "rgb" (0, 1, 2), or a
    sequence of names of ``BANDS`` ("B04", "B08", ...) and/or indices 0..3, in the given order."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return tuple(range(len(BANDS)))
    if isinstance(spec, str) and spec.strip().lower() == "rgb":
        return RGB
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for band in items:
        if isinstance(band, str) and band.strip().upper() in BANDS:
            index = BANDS.index(band.strip().upper())
        elif isinstance(band, (int, np.integer)) and 0 <= int(band) < len(BANDS):
            index = int(band)
        else:
            raise ValueError(f"unknown Sen2_MTC_New band {band!r}; bands are {', '.join(BANDS)} (0..3)")
        if index in out:
            raise ValueError(f"band {BANDS[index]} selected twice in {spec!r}")
        out.append(index)
    return tuple(out)


def _pixels(ds, path: Path, indexes: list[int]) -> np.ndarray:
    import rasterio

    try:
        data = ds.read(indexes)
    except rasterio.errors.RasterioError as e:
        raise DataError(path, f"cannot read pixels, file truncated or corrupt? ({e})") from e
    data = np.moveaxis(data, 0, -1).astype(np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(path, f"{int(bad.sum())} non-finite (NaN/Inf) values")
    return normalize_s2(data)


def read_sample(sample: Sample, bands: None | str | Sequence[int | str] = None) -> dict[str, Any]:
    """Read and validate one sample.

    Returns a dict: "s2" (H, W, C) float32 [0, 1], the clear target; "s2_cloudy" (3, H, W, C) float32 [0, 1],
    the cloudy dates in index order _0, _1, _2; "id" str; "tile" str. C is the band selection
    (``resolve_bands``; default all 4, R, G, B, NIR). Raises DataError naming the offending file.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    indexes = [i + 1 for i in resolve_bands(bands)]
    with rasterio.Env(**GDAL_ENV), ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain TIFFs are fine: only pixels matter
        opened = {"count": len(BANDS), "dtypes": DTYPES}
        clear = open_geotiff(sample.s2, stack, "clear Sen2_MTC_New image", **opened)
        cloudy = [
            open_geotiff(path, stack, f"cloudy Sen2_MTC_New image (date {j})", grid_of=(clear, sample.s2),
                         **opened)
            for j, path in enumerate(sample.s2_cloudy)
        ]
        return {
            "s2": _pixels(clear, sample.s2, indexes),
            "s2_cloudy": np.stack([_pixels(ds, p, indexes) for ds, p in zip(cloudy, sample.s2_cloudy)]),
            "id": sample.id,
            "tile": sample.tile,
        }


def read_sample_or_none(
    sample: Sample,
    bands: None | str | Sequence[int | str] = None,
    *,
    on_error: str = "raise",
    bad_samples: BadSampleLog | None = None,
) -> dict[str, Any] | None:
    """``read_sample``; with ``on_error="skip"`` a DataError returns None and is recorded in bad_samples."""
    _check_choice("on_error", on_error, ("raise", "skip"))
    try:
        return read_sample(sample, bands)
    except DataError as err:
        if on_error == "raise":
            raise
        (bad_samples if bad_samples is not None else BadSampleLog()).record(sample.id, err)
        return None


# -------------------------------------------------------------------------------------------------- synthetic

# Default synthetic tiles, one or two per split: real Sen2_MTC_New tile names (T09WWP_R071 is a tile of the
# dataset whose split we do not know; T22MCT_R024 is a published val tile, T12TUR_R027 a published test tile)
# and one made-up name, T00SYN_R001.
DEFAULT_SYNTHETIC_TILES = {
    "train": ("T09WWP_R071", "T00SYN_R001"),
    "val": ("T22MCT_R024",),
    "test": ("T12TUR_R027",),
}
_SYNTHETIC_COVERS = (0.6, 0.35, 0.15)  # thick-cloud fraction of dates 0, 1, 2


def _write_tif(path: Path, array: np.ndarray) -> None:
    """(H, W, C) array -> a plain pixel-interleaved TIFF (no georeferencing), as tifffile would read it."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, count = array.shape
    profile = {"driver": "GTiff", "dtype": array.dtype.name, "count": count, "height": height, "width": width,
               "interleave": "pixel"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.ascontiguousarray(np.moveaxis(array, -1, 0)))


def synthetic_sample(size: int, seed: int) -> dict[str, np.ndarray]:
    """One synthetic sample as uint16 DN: "s2" (H, W, 4) and "s2_cloudy" (3, H, W, 4), bands R, G, B, NIR;
    "thick" and "thin" (3, H, W) float32, each date's cloud opacities (what a cloud detector should find).

    Built from ``crrf_jax.data.synthetic.synthetic_scene``: the same ground on every date, the cloudy dates
    under clouds of decreasing extent (thick-cloud fractions 0.6, 0.35, 0.15). Each date is its own
    acquisition (``synthetic_scene(acquisition=j)``): its own cloud field and radiometry, so the clouds move
    between dates and most pixels cloudy on one date are clear on another (what a temporal model and the
    least-cloudy composite exploit).
    """
    from crrf_jax.data.contract import S2_BANDS
    from crrf_jax.data.synthetic import synthetic_scene

    pick = [S2_BANDS.index(b) for b in BANDS]
    scenes = [synthetic_scene(size, seed=seed, cloud_cover=c, acquisition=j)
              for j, c in enumerate(_SYNTHETIC_COVERS)]
    return {
        "s2": scenes[0]["s2"][..., pick],
        "s2_cloudy": np.stack([scene["s2_cloudy"][..., pick] for scene in scenes]),
        "thick": np.stack([scene["thick"] for scene in scenes]),  # (3, H, W) cloud opacities, for tests
        "thin": np.stack([scene["thin"] for scene in scenes]),
    }


def write_synthetic_sen2_mtc(
    root: str | os.PathLike,
    tiles: dict[str, Sequence[str]] | None = None,
    images_per_tile: int = 2,
    size: int = 32,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Writes a small Sen2_MTC_New copy under root in the official layout; returns split -> sample ids in
    ``find_samples`` order.

    `tiles` maps each split to its tile names (default ``DEFAULT_SYNTHETIC_TILES``); each tile gets images
    ``<tile>_0`` .. ``<tile>_<images_per_tile - 1>`` of `size` x `size` pixels, uint16 DN, and each split its
    ``<split>.txt``. Deterministic given `seed`; files are overwritten.
    """
    if images_per_tile < 1:
        raise ValueError(f"images_per_tile must be positive, got {images_per_tile}")
    root = Path(root)
    tiles = dict(DEFAULT_SYNTHETIC_TILES if tiles is None else tiles)
    ids: dict[str, list[str]] = {}
    n = 0
    for split, names in tiles.items():
        _check_choice("split", split, SPLITS)
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.txt").write_text("".join(f"{t}\n" for t in names))
        ids[split] = []
        for tile in names:
            for k in range(images_per_tile):
                sample = sample_paths(root, tile, f"{tile}_{k}")
                data = synthetic_sample(size, seed=int(seed) * 1_000_003 + n)
                n += 1
                _write_tif(sample.s2, data["s2"])
                for path, image in zip(sample.s2_cloudy, data["s2_cloudy"]):
                    _write_tif(path, image)
                ids[split].append(sample.id)
    return ids
