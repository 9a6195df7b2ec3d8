"""Trains crrf-jax: the S2 and S1 autoencoders, their latent statistics, the rectified-flow transformer, then
the pixel-space refiner.

    python train.py --config=configs/demo.py --workdir=runs/demo                 # synthetic data, CPU, minutes
    python train.py --config=configs/sen12mscr.py --config.data.root=DATA --workdir=runs/base
    python train.py --config=configs/sen12mscr.py:variant=base,stage=flow --config.flow.lr=5e-5 ...

Without a stage every stage runs in order (crrf_jax/config.py STAGES; each is a class in crrf_jax/stages.py,
trained by the loop in crrf_jax/trainer.py); each resumes on its own from `<workdir>/<stage>/checkpoints`, and a
finished stage leaves its EMA weights in `<workdir>/<stage>/final` for the next. SIGTERM (preemption) saves a
checkpoint and exits 0. Logs: TensorBoard in `<workdir>/<stage>/tb`, a JSON-lines trace in
`<workdir>/<stage>/metrics.jsonl`, preview PNGs in `<workdir>/<stage>/previews`.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from crrf_jax import paths, train_lib, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config file (with :args).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and outputs: a local folder or a URL (gs://bucket/run).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of configuration and data errors.")

log = logging.getLogger("crrf_jax.train")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    config, workdir = _CONFIG.value, paths.as_path(_WORKDIR.value)  # local: absolute; gs://: as given
    setup_logging()
    try:
        trainer.run(config, workdir)
    except trainer.Preempted:
        log.info("preempted: checkpoint saved, exiting cleanly")
        sys.exit(0)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, train_lib.NonFiniteError) as err:
        # Bad configuration or data, or a missing optional package (gcsfs for gs://): the message names the
        # key, file or package; the traceback adds nothing for users.
        if _TRACEBACK.value:
            raise
        sys.exit(f"error: {err}\n(rerun with --traceback for the full traceback)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a --config.<key> naming no config field into a one-line error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        sys.exit(f"FATAL flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as err:  # ml_collections raises these for an unknown override key
        message = err
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]
        message = str(message)
        key = message.splitlines()[0].strip("'\"")
        culprits = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
        if not culprits:  # not an override's fault (e.g. a bug in the config file): the traceback helps
            raise
        hint = "".join(f"\n{line}" for line in message.splitlines()[1:])
        sys.exit(f"error: {culprits[0]}: the config has no field {key!r}{hint}")


def setup_logging() -> None:
    """Our INFO messages on stderr; libraries (Orbax, grain, absl) only from WARNING up."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("crrf_jax")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def cli() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
