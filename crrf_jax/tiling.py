"""Scenes of any size as overlapping tiles, blended back with a raised-cosine window so seams do not show.

- `TileLayout(height, width, tile, overlap)`: where the tiles lie (`tile_starts`) and their blend weights
  (`blend_ramp`); scenes smaller than a tile are reflect-padded (`pad_to`) and cropped back.
- `blend_tiles(layout, read_rows, predict, write_rows)`: the streaming tiler, which reads and writes rows of
  tiles so memory stays bounded on large scenes, reading, predicting, blending and writing in threads of
  their own so each overlaps the others. It knows nothing of models: `predict` is any function that submits a
  batch of tiles and returns a call waiting for its result (CloudRemover.process passes its sampler, the
  tests deterministic fakes).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Arrays = dict[str, np.ndarray]


def tile_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of tiles of `tile` pixels covering max(length, tile) pixels, overlapping >= `overlap`.

    The first tile starts at 0, the last ends at the edge, the others are spread evenly between.
    """
    span = max(length, tile)
    if span == tile:
        return (0,)
    n = math.ceil((span - tile) / (tile - overlap)) + 1
    return tuple(int(round(s)) for s in np.linspace(0, span - tile, n))


def blend_ramp(tile: int, overlap: int, taper_start: bool = True, taper_end: bool = True) -> np.ndarray:
    """1-D blend weights (tile,) float32: a raised-cosine rise over the first `overlap` pixels and fall over
    the last (only on tapered sides: a side on the scene border keeps weight 1), 1 in between, > 0 everywhere.
    """
    w = np.ones(tile, np.float32)
    if overlap > 0:
        rise = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        if taper_start:
            w[:overlap] = np.minimum(w[:overlap], rise)
        if taper_end:
            w[tile - overlap :] = np.minimum(w[tile - overlap :], rise[::-1])
    return w


def pad_to(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(h, w, ...) -> (max(h, rows), max(w, cols), ...) by reflection at the bottom and right edges."""
    pad_r, pad_c = max(rows - array.shape[0], 0), max(cols - array.shape[1], 0)
    if not pad_r and not pad_c:
        return array
    widths = [(0, pad_r), (0, pad_c)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode="reflect")


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Where the tiles of a height x width scene lie (on the reflect-padded grid of at least one tile)."""

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"scene size {self.height}x{self.width} is empty")
        if not 0 <= self.overlap <= self.tile // 2:
            raise ValueError(f"overlap {self.overlap} must be in [0, tile/2 = {self.tile // 2}]")

    @functools.cached_property
    def ys(self) -> tuple[int, ...]:
        return tile_starts(self.height, self.tile, self.overlap)

    @functools.cached_property
    def xs(self) -> tuple[int, ...]:
        return tile_starts(self.width, self.tile, self.overlap)

    @property
    def padded_height(self) -> int:
        return max(self.height, self.tile)

    @property
    def padded_width(self) -> int:
        return max(self.width, self.tile)

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def window(self, row: int, col: int) -> np.ndarray:
        """Blend weights (tile, tile) float32 of tile (row, col); no taper on the scene's outer edges."""
        wy = blend_ramp(self.tile, self.overlap, row > 0, row < len(self.ys) - 1)
        wx = blend_ramp(self.tile, self.overlap, col > 0, col < len(self.xs) - 1)
        return np.outer(wy, wx)


ReadRows = Callable[[int, int], Arrays]  # (y0, y1) on the padded grid -> name: (y1 - y0, padded_width, C)
PendingTiles = Callable[[], tuple[np.ndarray, np.ndarray | None]]  # waits for a batch: -> mean, std or None
PredictTiles = Callable[[Arrays, np.ndarray], PendingTiles]  # tiles, ids -> submitted batch
IN_FLIGHT_BATCHES = 2  # blend_tiles: batches submitted ahead of the one waited for (and queued for writing)
WriteRows = Callable[[int, int, np.ndarray, np.ndarray | None], None]  # y0, y1, mean/std (y1 - y0, width, C)


class _RowAccumulator:
    """Weighted sums of blended tiles over a band of rows [start, start + held) of the padded grid: of the
    tiles' mean, and of their std unless the tiles come without one (std None: not asked for).

    The band lives at rows [base, base + held) of buffers that are reused: finished rows leave by moving
    `base` down, and only when the buffers' end is reached do the rows still held move back to the top
    (rows past the band are kept zero for the tiles to come). The buffers grow, to twice the band, only when
    a band holds more rows than fit. So a scene costs a few copies of a band, not a new band per row of
    tiles."""

    def __init__(self, width: int):
        self.start, self.base, self.held, self.width = 0, 0, 0, width
        self.sums: list[np.ndarray] | None = None  # [mean] or [mean, std] sums, each (capacity, width, C)
        self.weight = np.zeros((0, width), np.float32)

    def add(self, y: int, x: int, mean: np.ndarray, std: np.ndarray | None, weight: np.ndarray) -> None:
        """Adds tile (mean, std) (T, T, C) at (y, x) with blend weights `weight` (T, T, C), the tile's window
        repeated over the channels: an elementwise product, several times faster than numpy's broadcast over
        a short channel axis."""
        values = [mean] if std is None else [mean, std]
        t = mean.shape[0]
        if self.sums is None:
            self.sums = [np.zeros((0, self.width, mean.shape[-1]), np.float32) for _ in values]
        if len(values) != len(self.sums):
            raise ValueError("blend_tiles: every batch must come with a std, or none")
        end = y - self.start + t  # the band's rows needed, from `start`
        if self.base + end > self.weight.shape[0]:
            self._make_room(end)
        self.held = max(self.held, end)
        rows = slice(self.base + y - self.start, self.base + end)
        for total, value in zip(self.sums, values, strict=True):
            total[rows, x : x + t] += weight * value
        self.weight[rows, x : x + t] += weight[..., 0]

    def _make_room(self, rows: int) -> None:
        """Room for `rows` rows of band from the buffers' top: the held rows moved up, or bigger buffers."""
        held = slice(self.base, self.base + self.held)
        if rows <= self.weight.shape[0]:
            for buffer in (*self.sums, self.weight):
                buffer[: self.held] = buffer[held]  # numpy copies overlapping ranges as through a temporary
                buffer[self.held : held.stop] = 0
        else:
            def grown(buffer: np.ndarray) -> np.ndarray:
                new = np.zeros((2 * rows, *buffer.shape[1:]), np.float32)
                new[: self.held] = buffer[held]
                return new

            self.sums, self.weight = [grown(total) for total in self.sums], grown(self.weight)
        self.base = 0

    def pop(self, until: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [start, until), finished: weighted means of the tiles' mean and std (None without one); they
        leave the band."""
        n = until - self.start
        rows = slice(self.base, self.base + n)
        w = self.weight[rows, :, None]
        if n > self.held or np.any(w <= 0):
            raise AssertionError("blend_tiles: a pixel was covered by no tile")
        out = [total[rows] / w for total in self.sums]
        self.start, self.base, self.held = until, self.base + n, self.held - n
        return out[0], out[1] if len(out) > 1 else None


def blend_tiles(
    layout: TileLayout,
    read_rows: ReadRows,
    predict: PredictTiles,
    write_rows: WriteRows,
    *,
    batch_size: int = 8,
    in_flight: int = IN_FLIGHT_BATCHES,
    progress: bool = False,
) -> None:
    """Predicts a scene tile by tile and writes the blended result row band by row band.

    Tiles are read one row of tiles at a time (`read_rows(y, y + tile)`), predicted `batch_size` at a time
    (`predict(tiles, tile_ids)` with tiles name -> (n, tile, tile, C) and ids the row-major tile indices; it
    returns a call that waits for the batch's (mean, std), std None in every batch where none is wanted),
    and blended with `layout.window`: every output pixel is the weight-normalised mean of the tiles covering
    it. As soon as no later tile reaches a row, it is written (`write_rows(y0, y1, mean, std)`, cropped to the
    scene; std None without one), so memory holds a few rows of tiles whatever the scene size.

    Four threads share the work, so the device is not left waiting for the host: a reading thread reads the
    next row of tiles (`read_rows` runs only there); the caller's thread batches tiles and submits them,
    keeping up to `in_flight` batches submitted before it waits for the oldest (every `predict` and every
    wait for its result happen in this thread, in submission order, as collectives across processes need);
    a blending thread blends the results, with at most `in_flight` batches waiting for it; and a writing
    thread writes the finished rows (`write_rows` runs only there, one call at a time, rows in order), with
    at most one band of rows waiting for it. in_flight=0 does each batch's predict, wait, blend and write in
    turn. The result does not depend on `in_flight` or `batch_size`.
    """
    from tqdm.auto import tqdm

    if in_flight < 0:
        raise ValueError(f"in_flight must be >= 0, got {in_flight}")
    writing = _InOrder(write_rows, min(in_flight, 1), "write_rows")
    blend = _Blend(layout, writing)
    blending = _InOrder(blend, in_flight, "blend_rows")
    bar = tqdm(total=math.ceil(layout.num_tiles / batch_size), desc="tile batches", unit="batch",
               disable=not progress, dynamic_ncols=True)
    submitted: collections.deque = collections.deque()  # (where, wait for mean and std), oldest first

    def settle(limit: int) -> None:  # waits until at most `limit` batches are submitted
        while len(submitted) > limit:
            where, wait = submitted.popleft()
            blending(where, *wait())
            bar.update(1)

    try:
        for where, stacked, ids in _batches(layout, read_rows, batch_size):
            submitted.append((where, predict(stacked, ids)))
            settle(in_flight)
        settle(0)
        blending.drain()  # then every write has been submitted
        writing.drain()
    finally:
        blending.close()
        writing.close()
        bar.close()
    blend.check_done()


class _InOrder:
    """Calls of `fn`, run one at a time in the order made, in a thread of its own, with at most `limit` calls
    waiting (a call beyond that waits for the oldest; limit 0: each call waits for itself). A call re-raises
    what an earlier one raised when it waits for it; `drain` waits for all of them."""

    def __init__(self, fn: Callable[..., None], limit: int, name: str):
        self.fn, self.limit = fn, limit
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.pending: collections.deque = collections.deque()  # futures, oldest first

    def __call__(self, *args) -> None:
        self.pending.append(self.pool.submit(self.fn, *args))
        while len(self.pending) > self.limit:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def _batches(layout: TileLayout, read_rows: ReadRows, batch_size: int
             ) -> Iterator[tuple[list[tuple[int, int]], Arrays, np.ndarray]]:
    """The scene's tiles in row-major batches: ((row, col) of each tile, stacked tiles, tile ids). The next
    row of tiles is read in a thread while this one is batched and predicted (file reads and XLA both release
    the GIL); `read_rows` is only ever called from that one thread."""
    t = layout.tile

    def tiles() -> Iterator[tuple[int, int, Arrays]]:
        with ThreadPoolExecutor(1, thread_name_prefix="read_rows") as pool:
            pending = pool.submit(read_rows, layout.ys[0], layout.ys[0] + t)
            for r in range(len(layout.ys)):
                band = pending.result()
                if r + 1 < len(layout.ys):
                    pending = pool.submit(read_rows, layout.ys[r + 1], layout.ys[r + 1] + t)
                for c, x in enumerate(layout.xs):
                    yield r, c, {k: v[:, x : x + t] for k, v in band.items()}

    stream = tiles()
    while chunk := list(itertools.islice(stream, batch_size)):
        stacked = {k: np.stack([b[2][k] for b in chunk]) for k in chunk[0][2]}
        ids = np.asarray([r * len(layout.xs) + c for r, c, _ in chunk], np.int32)
        yield [(r, c) for r, c, _ in chunk], stacked, ids


class _Blend:
    """Blends predicted tiles into the scene's rows and writes each band of rows once no later tile reaches
    it; called with the batches in row-major order."""

    def __init__(self, layout: TileLayout, write_rows: WriteRows):
        self.layout, self.write_rows = layout, write_rows
        self.acc = _RowAccumulator(layout.padded_width)
        self.remaining = [len(layout.xs)] * len(layout.ys)  # tiles of each tile row not yet blended
        self.next_row = 0  # first tile row not yet complete
        self.windows: dict[tuple[bool, ...], np.ndarray] = {}  # (T, T, C) by which sides taper

    def window(self, r: int, c: int, channels: int) -> np.ndarray:
        """`layout.window(r, c)` repeated over `channels`, made once for each kind of tile (at most 9)."""
        rows, cols = len(self.layout.ys), len(self.layout.xs)
        key = (r > 0, r < rows - 1, c > 0, c < cols - 1)
        if key not in self.windows:
            self.windows[key] = np.repeat(self.layout.window(r, c)[..., None], channels, axis=-1)
        return self.windows[key]

    def __call__(self, where: list[tuple[int, int]], mean: np.ndarray, std: np.ndarray | None) -> None:
        layout, acc = self.layout, self.acc
        for i, (r, c) in enumerate(where):
            acc.add(layout.ys[r], layout.xs[c], mean[i], None if std is None else std[i],
                    self.window(r, c, mean.shape[-1]))
            self.remaining[r] -= 1
        while self.next_row < len(layout.ys) and self.remaining[self.next_row] == 0:
            self.next_row += 1
        until = layout.ys[self.next_row] if self.next_row < len(layout.ys) else layout.padded_height
        if until > acc.start:
            y0 = acc.start
            rows_mean, rows_std = acc.pop(until)
            end = min(until, layout.height)
            if end > y0:
                self.write_rows(y0, end, rows_mean[: end - y0, : layout.width],
                                None if rows_std is None else rows_std[: end - y0, : layout.width])

    def check_done(self) -> None:
        if self.acc.start != self.layout.padded_height:
            raise AssertionError(f"blend_tiles: rows {self.acc.start}..{self.layout.height} were never "
                                 "written")
