"""The reference run of `test_train.py`'s multi-process test: one process trains on all its
devices with the global batches that `--shards` processes of `train.py` assemble (process i
reads shard i of the data and feeds the i-th slice of the devices), then writes the parameters
to WORKDIR/export and the batch fingerprints of shard 0 to WORKDIR/fingerprints.json.

    python tests/shard_reference.py --config configs/synthetic_mff.py --workdir W --shards 2 \
        [--config.FIELD=VALUE ...]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from mgdn_jax import checkpoint, input_pipeline, train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_SHARDS = flags.DEFINE_integer("shards", 2, "Number of processes whose batches to assemble.")
flags.mark_flags_as_required(["config", "workdir"])


def global_batch(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The processes' batches, in process order -> one batch of their inputs and targets."""
    return {
        "inputs": tuple(np.concatenate(x) for x in zip(*(part["inputs"] for part in parts))),
        "target": np.concatenate([part["target"] for part in parts]),
    }


def main(argv: list[str]) -> None:
    del argv
    config, workdir, shards = _CONFIG.value, Path(_WORKDIR.value), _SHARDS.value
    mesh = train_lib.create_mesh(config.mesh)
    tx, schedule = train_lib.create_optimizer(config.optimizer, config.total_steps)
    graphdef, initial = train_lib.init_state(config, tx)
    state = jax.jit(initial, out_shardings=NamedSharding(mesh, P()))()
    train_step = train_lib.make_train_step(config, graphdef, tx, schedule, mesh)
    loaders = [
        iter(
            input_pipeline.create_train_loader(
                config, shard_options=grain.sharding.ShardOptions(i, shards, drop_remainder=True)
            )
        )
        for i in range(shards)
    ]
    fingerprints = []
    for _ in range(config.total_steps):
        parts = [next(loader) for loader in loaders]
        fingerprints.append(train_lib.batch_fingerprint(parts[0]))
        state, _ = train_step(state, train_lib.device_batch(global_batch(parts), mesh))
    checkpoint.export_params(state["params"], config.model, workdir / "export")
    (workdir / "fingerprints.json").write_text(json.dumps(fingerprints))


if __name__ == "__main__":
    app.run(main)
