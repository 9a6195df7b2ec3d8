"""A tiny grain source whose samples say which process read them and whether its allocator settings were in
effect there (`host_memory.keep_large_buffers`), for tests/test_host_memory.py. Importable by grain's worker
processes, which unpickle it."""

import os

import numpy as np

from crrf_jax.data import host_memory


class AllocatorReport:
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        image = np.zeros((4, 4, 13), np.uint16)
        return {"s2": image, "s2_cloudy": image, "cloud_prob": np.zeros((4, 4, 1), np.uint8),
                "id": f"{os.getpid()} {host_memory._applied}"}
