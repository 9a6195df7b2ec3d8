"""The reading process's allocator: patch-sized blocks come from the heap and stay there once freed.

Most cases run in a fresh Python process (glibc's thresholds are per process, and its dynamic ones only
rise), which reports glibc's own counters (`mallinfo2`) around a 16 MB block: whether it was mapped on its
own, and how much freed memory the heap kept after it. The last one reads through a grain worker, whose
samples report the worker's settings.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    libc = ctypes.CDLL(None)
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    applied = None
    {setup}
    before = libc.mallinfo2().hblks
    block = libc.malloc(16 << 20)
    mapped = libc.mallinfo2().hblks - before
    libc.free(block)
    print(json.dumps({{"applied": applied, "mapped": mapped, "kept_free": libc.mallinfo2().fordblks}}))
""")


def _probe(setup: str, env: dict | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], capture_output=True, text=True,
                         cwd=REPO, env={**clean, **(env or {})}, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    import ctypes

    return hasattr(ctypes.CDLL(None), "mallinfo2")


pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc's allocator (mallinfo2, glibc >= 2.33) only")

_KEEP = "from crrf_jax.data import host_memory; applied = host_memory.keep_large_buffers()"


def test_glibc_alone_maps_a_patch_sized_block_and_gives_it_back():
    control = _probe("")
    assert control["mapped"] == 1
    assert control["kept_free"] < 16 << 20


def test_kept_buffers_come_from_the_heap_and_stay_there():
    result = _probe(_KEEP)
    assert result["applied"] is True
    assert result["mapped"] == 0
    assert result["kept_free"] >= 16 << 20


def test_the_users_own_malloc_settings_win():
    result = _probe(_KEEP, env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert result["applied"] is False
    assert result["mapped"] == 1  # the user's 1 MB threshold, not ours


def test_a_pipeline_that_reads_in_this_process_keeps_its_buffers(tmp_path):
    setup = textwrap.dedent(f"""
        from crrf_jax.data import cloudprob, host_memory, pipeline, synthetic
        root = {str(tmp_path)!r}
        synthetic.write_synthetic_dataset(root, n_scenes=8, size=32, seed=1)
        cloudprob.compute_cloud_probs(root, workers=0)
        next(iter(pipeline.make_dataset(root=root, batch_size=2, process_index=0, process_count=1)))
        applied = host_memory._applied  # what make_dataset did, not a call of ours
    """)
    result = _probe(setup)
    assert result["applied"] is True
    assert result["mapped"] == 0


def test_the_pipeline_applies_it_in_its_grain_workers():
    """Each worker process applies it (the pipeline's worker_init_fn); the samples it read say so. (This
    process may have applied it already, for another test: the no-worker case is the subprocess test above.)"""
    import grain

    from crrf_jax.data import pipeline
    from tests.helpers.allocator_source import AllocatorReport

    source = AllocatorReport()
    reader = pipeline._ShardReader(source, list(range(len(source))), len(source), "raise")
    dataset = pipeline._batched(grain.MapDataset.source(reader), 2, None, False, False, 0, 1, True, 1, 2, 1)
    iterator = iter(dataset)
    try:
        ids = [str(i) for i in next(iterator)["id"]]
    finally:
        iterator.close()
    pids = {int(i.split()[0]) for i in ids}
    assert {i.split()[1] for i in ids} == {"True"}, ids
    assert os.getpid() not in pids, (pids, os.getpid())
