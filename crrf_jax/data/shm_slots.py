"""Reused shared memory for the batches grain's worker processes hand to the main process.

grain gives every array a worker makes its own fresh shared-memory segment, which the main process unlinks
once the array is collected. A fresh tmpfs segment is slow to create, fault in and free: writing an 8 MB
batch of S2 patches into one takes about 11 ms on this project's CPU machines, against 0.5 ms into memory
that is reused, more than reading the patches from disk (BENCHMARKS.md, Data pipeline; grain issue 851).

Here each worker keeps a pool of slots instead: files under /dev/shm that it maps once and fills again.

- The worker leases a free slot, writes the batch into it and sends grain only references (`SlotArray`:
  the slot's file, offset, shape, dtype), a few hundred bytes.
- The main process maps each slot file once (then unlinks it, so nothing stays under /dev/shm once both
  processes have unmapped it, however they exit), hands out numpy views of it, and frees the slot when the
  last of them is collected (a finalizer on their common base array).
- A worker that finds no free slot (the consumer keeps many batches alive, or a restore dropped batches in
  flight) makes a new one, up to `max_slots`; past that it returns None and the caller uses grain's own
  fresh segments. It never waits for the consumer, so no consumer can deadlock it.

Linux only (`available()`: /dev/shm); elsewhere the callers keep grain's path.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import mmap
import multiprocessing.util
import os
import secrets
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_ALIGN = 64  # bytes: every array of a slot starts on a cache line
_FREE, _IN_USE = 0, 1


def file_prefix(main_pid: int) -> str:
    """How the slot files of the workers of process `main_pid` begin."""
    return f"crrf_{main_pid}_"


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


@dataclasses.dataclass(frozen=True)
class SlotArray:
    """One array of a batch in a worker's slot: what crosses the process boundary instead of its bytes."""

    pool: str  # the pool's flag file (one byte per slot, in use or free)
    slot: int
    file: str  # the slot's file under SHM_DIR (a new name when the worker grows the slot)
    offset: int
    shape: tuple[int, ...]
    dtype: str


def _create(name: str, size: int) -> mmap.mmap:
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC here, as an OSError, rather than SIGBUS on first write
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)  # a file system without fallocate: sized as grain sizes its segments
        return mmap.mmap(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


class SlotPool:
    """A worker's slots. `lease(arrays)` -> a `Slot` to fill, or None (no free slot and `max_slots` made).

    Files not yet mapped by the main process are unlinked when the worker process exits."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.prefix = f"{file_prefix(os.getppid())}{os.getpid()}_{secrets.token_hex(4)}"
        self.flags_name = f"{self.prefix}_flags"
        self.flags = _create(self.flags_name, max_slots)
        self.slots: list[tuple[str, mmap.mmap]] = []  # (file name, mapping) per slot
        self._made: list[str] = [self.flags_name]
        self._full = False
        multiprocessing.util.Finalize(self, _unlink_all, args=(self._made,), exitpriority=10)

    def lease(self, arrays: Sequence[tuple[Sequence[int], Any]]) -> Slot | None:
        """A free slot marked in use that holds `arrays` ((shape, dtype) each, in the order `Slot.array`
        will be asked for them), or None."""
        nbytes = max(sum(_aligned(math.prod(shape) * np.dtype(dtype).itemsize) for shape, dtype in arrays), 1)
        free = [i for i in range(len(self.slots)) if self.flags[i] == _FREE]
        fits = [i for i in free if len(self.slots[i][1]) >= nbytes]
        if fits:
            index = fits[0]
        elif free or len(self.slots) < self.max_slots:
            index = free[0] if free else len(self.slots)
            try:
                self._make(index, nbytes)
            except OSError as err:  # /dev/shm full: grain's path for this batch (it needs the room too)
                self._note_once(logging.WARNING, f"cannot make a {nbytes}-byte slot under {SHM_DIR} ({err})")
                return None
        else:
            self._note_once(logging.INFO, f"all {self.max_slots} slots are held by batches still alive")
            return None
        self.flags[index] = _IN_USE
        return Slot(self, index)

    def _make(self, index: int, nbytes: int) -> None:
        name = f"{self.prefix}_{index}_{secrets.token_hex(2)}"
        mapping = _create(name, nbytes)
        self._made.append(name)
        if index < len(self.slots):  # a free slot too small for this batch: replaced (the main process
            self.slots[index] = (name, mapping)  # maps the new file when a reference names it)
        else:
            self.slots.append((name, mapping))

    def _note_once(self, level: int, reason: str) -> None:
        if not self._full:
            self._full = True
            logger.log(level, "%s: batches go through grain's fresh shared memory while this lasts", reason)


def make_pool(max_slots: int) -> SlotPool | None:
    """A worker's SlotPool, or None (logged) where /dev/shm refuses its files: then grain's path serves."""
    try:
        return SlotPool(max_slots)
    except OSError as err:
        logger.warning("cannot keep shared-memory slots under %s (%s): batches go through grain's fresh "
                       "shared memory", SHM_DIR, err)
        return None


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _unlink_all(names: list[str]) -> None:
    for name in names:
        _unlink(name)


class Slot:
    """A leased slot being filled: `array(shape, dtype)` gives the next aligned region to write and the
    reference that stands for it in the batch."""

    def __init__(self, pool: SlotPool, index: int):
        self.pool, self.index = pool, index
        self.name, self.mapping = pool.slots[index]
        self.used = 0

    def array(self, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, SlotArray]:
        dtype = np.dtype(dtype)
        offset = _aligned(self.used)
        out = np.frombuffer(self.mapping, dtype, math.prod(shape), offset).reshape(shape)
        self.used = offset + out.nbytes
        return out, SlotArray(self.pool.flags_name, self.index, self.name, offset, tuple(shape), dtype.str)


class SlotReader:
    """The main process's side: `open(batch)` replaces the SlotArray entries of a batch by numpy views of
    the slot (mapped once per slot file), and frees the slot when the last view is collected. One per
    pipeline iterator; what it mapped stays mapped while any view of it lives."""

    def __init__(self):
        self._flags: dict[str, mmap.mmap] = {}
        self._slots: dict[tuple[str, int], tuple[str, mmap.mmap]] = {}

    def open(self, batch: dict[str, Any]) -> dict[str, Any]:
        refs = {k: v for k, v in batch.items() if isinstance(v, SlotArray)}
        if not refs:
            return batch
        first = next(iter(refs.values()))
        if any((r.pool, r.slot, r.file) != (first.pool, first.slot, first.file) for r in refs.values()):
            raise ValueError("a batch spans several shared-memory slots")
        sizes = {key: math.prod(ref.shape) * np.dtype(ref.dtype).itemsize for key, ref in refs.items()}
        extent = max(ref.offset + sizes[key] for key, ref in refs.items())
        base = np.frombuffer(self._mapping(first), np.uint8, extent)  # every view of the batch hangs on it
        weakref.finalize(base, _release, self._flag_file(first.pool), first.slot)
        out = dict(batch)
        for key, ref in refs.items():
            out[key] = base[ref.offset:ref.offset + sizes[key]].view(ref.dtype).reshape(ref.shape)
        return out

    def _flag_file(self, pool: str) -> mmap.mmap:
        if pool not in self._flags:
            self._flags[pool] = _map(pool)
        return self._flags[pool]

    def _mapping(self, ref: SlotArray) -> mmap.mmap:
        key = (ref.pool, ref.slot)
        cached = self._slots.get(key)
        if cached is None or cached[0] != ref.file:
            self._slots[key] = (ref.file, _map(ref.file))
        return self._slots[key][1]


def _map(name: str) -> mmap.mmap:
    """Maps a worker's file and unlinks it: from here on the two mappings are all that hold it."""
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError as err:
        raise RuntimeError(f"{path}: a batch's shared memory is gone (its worker process exited)") from err
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
        os.unlink(path)


def _release(flags: mmap.mmap, slot: int) -> None:
    flags[slot] = _FREE
