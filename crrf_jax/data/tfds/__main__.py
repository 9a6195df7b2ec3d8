"""Build the `sen12mscr` TFDS ArrayRecord shards without TensorFlow.

    python -m crrf_jax.data.tfds --manual_dir /data/SEN12MSCR --data_dir /data/tfds [--protocol exact]

(`tfds build` itself needs TensorFlow in tensorflow-datasets 4.9: its CLI imports tf at start-up.)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from crrf_jax.data import contract, sen12mscr
from crrf_jax.data.tfds.sen12mscr_dataset_builder import build_tfds, dataset_name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crrf_jax.data.tfds", description=__doc__.split("\n")[0])
    parser.add_argument("--manual_dir", required=True, help="SEN12MS-CR root in the official layout")
    parser.add_argument("--data_dir", required=True, help="where the TFDS shards go")
    parser.add_argument(
        "--protocol", default="exact", choices=(*sen12mscr.PROTOCOLS, "both"), help="split protocol (config)"
    )
    parser.add_argument("--skip_bad", action="store_true", help="log and skip bad samples instead of failing")
    parser.add_argument(
        "--cloud_prob_dir", default=None, help="cloud probability cache (default: manual_dir)"
    )
    parser.add_argument(
        "--compression", default="none", choices=("none", "zstd"), help="ArrayRecord records (none: fastest)"
    )
    parser.add_argument("--cloud_prob_workers", type=int, default=None, help="processes (default: CPU count)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    protocols = sen12mscr.PROTOCOLS if args.protocol == "both" else (args.protocol,)
    for protocol in protocols:
        try:
            builder = build_tfds(
                args.manual_dir,
                args.data_dir,
                protocol,
                on_error="skip" if args.skip_bad else "raise",
                cloud_prob_dir=args.cloud_prob_dir,
                cloud_prob_workers=args.cloud_prob_workers,
                compression=args.compression,
            )
        except (contract.DataError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        splits = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
        print(
            f"{dataset_name(protocol)} in {args.data_dir}: {splits}; bad samples skipped: "
            f"{builder.bad_samples.count}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
