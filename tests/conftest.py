"""Test-wide settings: CPU JAX, and one persistent XLA compilation cache shared by the tests, both pytest-xdist
workers and the subprocesses they start (most of the suite's time is XLA compiling on the CPU; a program one
process compiled is read by the next that needs it). Every program is cached, however quickly it compiled."""

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import CHEAP_XLA_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", CHEAP_XLA_FLAGS)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "crrf_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sen12mscr_sample"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The two real SEN12MS-CR triplets (../shared/data/sen12mscr_sample); skips where absent."""
    if not SAMPLE.is_dir():
        pytest.skip(f"real SEN12MS-CR sample not found at {SAMPLE} (it lives beside the repository)")
    return SAMPLE


# Scheduling only. The README runs the suite on two pytest-xdist workers, a test file per worker at a time
# (--dist loadfile), handed out in collection order. The files whose runs take minutes (train.py pipelines,
# multi-process and multi-device subprocesses) go first, longest first, so the two workers finish together
# instead of one of them running a long file alone at the end. The other files keep their order.
LONGEST_FIRST = (
    "test_benchmark_configs.py", "test_train.py", "test_multihost.py", "test_resume.py",
    "test_sharding.py", "test_predict.py", "test_multitemporal.py", "test_remote_workdir.py", "test_export.py",
    "test_pretrained.py", "test_inference.py", "test_train_step.py", "test_refiner.py",
)


def pytest_configure(config):
    # pytest-xdist (3.x) by default re-sorts the files by how many tests each has (--loadscope-reorder), which
    # hands the long files, most of them with few tests, out last; keep the order below instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay contiguous
