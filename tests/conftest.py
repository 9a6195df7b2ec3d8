"""Test-wide settings: CPU JAX, and one persistent XLA compilation cache shared by the tests and the
subprocesses they start (most of the suite's time is XLA compiling on the CPU)."""

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import CHEAP_XLA_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", CHEAP_XLA_FLAGS)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "crrf_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sen12mscr_sample"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The two real SEN12MS-CR triplets (../shared/data/sen12mscr_sample); skips where absent."""
    if not SAMPLE.is_dir():
        pytest.skip(f"real SEN12MS-CR sample not found at {SAMPLE} (it lives beside the repository)")
    return SAMPLE
