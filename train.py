"""Trains MGDN.

    python train.py --config configs/synthetic_mff.py --workdir /tmp/run
    python train.py --config configs/gdsr.py:8 --workdir W --config.optimizer.learning_rate=1e-4

Any config field can be overridden with --config.FIELD=VALUE. Re-running with the same
--workdir resumes from its latest checkpoint (WORKDIR/checkpoints/STEP). The final parameters
are exported to WORKDIR/export, which `mgdn-fuse --weights WORKDIR/export` reads.

Multi-host (one process per host): pass --multihost to call `jax.distributed.initialize()`,
which finds the coordinator on Cloud TPU, SLURM and similar clusters by itself, or give
--coordinator_address, --num_processes and --process_id explicitly (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment work as well). Every process runs the
same command with the same --workdir on a shared filesystem; CPU processes exchange their
collectives through gloo. Compiled programs are cached as for the other command-line tools
(`mgdn_jax.runtime`), so a resumed run skips most compilation, and like them the program
re-executes itself at start-up with glibc's malloc asking for transparent huge pages
(`runtime.use_huge_pages`; GLIBC_TUNABLES=glibc.malloc.hugetlb=0 turns that off).

Needs the `train` extra (TensorFlow and tensorboard, which clu's metric writers and periodic
actions import): pip install -e ".[train]".
"""

from __future__ import annotations

from mgdn_jax import runtime

if __name__ == "__main__":
    runtime.use_huge_pages()  # restarts the program: first, so that the imports below run once

import importlib.util
import logging
import sys
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from mgdn_jax import train_lib
from mgdn_jax.errors import EXIT_USAGE, config_error, run_cli


def _exit_config_error(e: Exception) -> None:
    """Reports what ml_collections raised for `--config` as one `error: ...` line, exit 2."""
    print(f"error: {config_error(e, sys.argv)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


try:
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        str(Path(__file__).resolve().parent / "configs" / "synthetic_mff.py"),
        "Training config: configs/<task>.py[:arg].",
    )
except Exception as e:  # without --config, the overrides in sys.argv apply to the default now
    _exit_config_error(e)

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, export).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["workdir"])


TRAIN_EXTRA = ("tensorflow", "tensorboard")


def check_train_extra() -> None:
    """Exits with a one-line message when a package of the `train` extra is missing."""
    missing = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"error: train.py needs {', '.join(missing)}: pip install -e '.[train]'")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_train_extra()
    runtime.configure()
    if _MULTIHOST.value or _COORDINATOR.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info(
        "process %d of %d, %d devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices(),
    )

    def train() -> None:
        try:
            config = _CONFIG.value
        except Exception as e:  # config_flags raises a config file's load error on first access
            raise config_error(e, sys.argv) from e
        train_lib.train_and_evaluate(config, _WORKDIR.value)

    try:
        return run_cli(train)
    except train_lib.NonFiniteLossError as e:
        logging.error("%s", e)
        return 1


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config file that does not load or an override of an unknown
    field reported as one `error: ...` line and exit status 2 (absl reports bad flags itself)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error:
        raise
    except Exception as e:  # config_flags passes on whatever loading the config file raised
        _exit_config_error(e)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
