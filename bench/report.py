"""Shared by the benchmarks: a description of the machine, and section-wise updates of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
# Another file to write the sections into (bench/gpu.sh --dry-run points it at a scratch copy).
BENCHMARKS_ENV = "CRRF_BENCHMARKS"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def machine(with_devices: bool = True, with_load: bool = True) -> str:
    """Accelerators (when JAX is used), CPU model and cores, load average (now), software versions."""
    parts = []
    if with_devices:
        import jax

        devices = jax.devices()
        parts.append(f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})")
    with_load = with_load and hasattr(os, "getloadavg")
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if with_load else ""
    parts.append(f"{cpu_model()}, {os.cpu_count()} CPU cores{load}")
    versions = f"Python {platform.python_version()}"
    if with_devices:
        import jax

        versions += f", jax {jax.__version__}"
    parts.append(versions)
    return "; ".join(parts)


def write_section(title: str, text: str, path: Path | None = None) -> None:
    """Replaces (or appends) the '## <title>' section of BENCHMARKS.md (or of $CRRF_BENCHMARKS), leaving the
    other sections alone."""
    path = Path(path or os.environ.get(BENCHMARKS_ENV) or BENCHMARKS)
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    section = text.rstrip() + "\n\n"
    updated = pattern.sub(lambda _: section, current) if pattern.search(current) else (
        current.rstrip() + "\n\n" + section
    )
    path.write_text(updated.rstrip() + "\n")


def write_json(path: str | os.PathLike, run: dict) -> None:
    """A benchmark's figures as JSON (for scripts that combine several benchmarks: bench/headline.py); values
    JSON cannot hold (numpy scalars, ...) as floats or strings."""
    def plain(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return str(v)

    Path(path).write_text(json.dumps(run, indent=2, default=plain))
