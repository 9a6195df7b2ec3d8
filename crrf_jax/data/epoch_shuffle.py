"""A seeded global shuffle whose cost per element does not depend on the dataset's size.

grain's `MapDataset.shuffle` sends every index through a keyed bijection of [0, n), computed afresh per
element. Its cost grows as the dataset shrinks: 5 us an element from about 16k elements up, 28 us at 1024,
0.4 ms at 64 and 0.9 ms at 32 (measured on this project's 2-core CPU, BENCHMARKS.md "Data pipeline"). Small
datasets are where that shows: the demo's few dozen cached scenes, a benchmark's bench-sized sets, where it
was most of a batch's host time.

`EpochShuffle` draws each epoch's permutation once, as a whole, and looks the elements up in it: O(n) memory
(16 bytes an element while drawing it, 8 after: under 2 MB for SEN12MS-CR's 122k training patches) and one
draw per epoch (about 0.1 s a million elements). Like grain's, it is a MapDataset over the repeated stream:
element i of the stream is element `perm_e[i mod n] + e n` of the parent, e = i div n the epoch, so every
epoch visits every element once in its own order, random access stays O(1) and a checkpointed position
restores exactly.

The permutation is a function of (seed, epoch, n) alone, stable across numpy versions: the order of the raw
64-bit outputs of PCG64 seeded by SeedSequence([seed, epoch]) (both documented as stable streams), sorted
stably.
"""

from __future__ import annotations

import threading

import grain
import numpy as np

_KEPT_EPOCHS = 2  # read threads straddle an epoch boundary: keep the latest two permutations


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle's order of [0, n) in `epoch`: (n,) int64."""
    keys = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])).random_raw(n)
    return np.argsort(keys, kind="stable")


class EpochShuffle(grain.MapDataset):
    """`parent` shuffled with `seed`, a fresh order every epoch (module docstring); safe under grain's read
    threads, and it pickles without its drawn permutations into worker processes."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"shuffle seed must be in [0, 2**32), got {seed}")
        self._seed = int(seed)
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of `epoch`, drawn on first use."""
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = permutation(len(self._parent), self._seed, epoch)
                latest = sorted([*self._orders, epoch])[-_KEPT_EPOCHS:]
                self._orders = {e: self._orders.get(e, order) for e in latest}
            return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        length = len(self._parent)
        epoch, position = divmod(int(index), length)
        return self._parent[int(self.order(epoch)[position]) + epoch * length]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lock"], state["_orders"] = None, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
