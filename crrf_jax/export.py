"""Exports a finished training run (workdir) to a self-contained inference bundle.

    python -m crrf_jax.export --workdir=runs/base --out=bundles/base [--overwrite] [--config=configs/x.py]

The run is read by crrf_jax.rundir (its config.json, each stage's `final` EMA weights, the latent statistics)
and written in the format of crrf_jax.bundle; load the bundle with `CloudRemover.from_bundle(path)`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from etils import epath

from crrf_jax import bundle, paths, rundir


def export_bundle(
    workdir: str | os.PathLike, out: str | os.PathLike, config=None, *, overwrite: bool = False
) -> epath.Path:
    """Reads a finished training run and writes its bundle (each local or a gs:// URL); returns its path."""
    if paths.as_path(out).exists() and not overwrite:  # before the (slow) read
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    return bundle.write_bundle(rundir.read_workdir(workdir, config), out, overwrite=overwrite)


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> its get_config(arg) (the big_vision config-string convention)."""
    file, _, arg = spec.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: config file does not exist")
    module_spec = importlib.util.spec_from_file_location("_crrf_export_config", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crrf_jax.export",
        description="Export a finished training run (workdir) to a self-contained inference bundle.",
    )
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--config", default=None,
                        help="training config file[:arg] (default: <workdir>/config.json from train.py)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    args = parser.parse_args(argv)
    try:
        config = load_config_file(args.config) if args.config else None
        out = export_bundle(args.workdir, args.out, config, overwrite=args.overwrite)
    except (bundle.BundleError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote bundle {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
