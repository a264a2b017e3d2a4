"""Training checkpoints and the params-only export.

A training run keeps its checkpoints in `WORKDIR/checkpoints/STEP/`, written by an orbax
`CheckpointManager` with two items:
- `state`: the train state pytree {"step", "params", "opt_state", "rng"} and, with
  `ema_decay` > 0, "ema" (`StandardSave`); plain orbax restores it without this project's code.
- `data`: the grain input iterator's state (grain's checkpoint handler: one JSON file per
  process), so that a resumed run sees exactly the batches an uninterrupted one would.

`export_params` writes `WORKDIR/export` in the `mgdn_jax.convert.save_converted` format
(DIR/params + DIR/config.json), which `mgdn-fuse --weights WORKDIR/export` reads.

`barrier` synchronises the processes of a multi-process run through JAX's coordination service.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

STATE, DATA = "state", "data"
BARRIER_TIMEOUT_MS = 3_600_000
_barriers = itertools.count()


def barrier(name: str) -> None:
    """Returns once every process has reached this barrier; a no-op with one process. Every
    process must pass the same barriers in the same order. A coordination-service barrier, not
    a device collective: CPU collectives (gloo) fail when the processes arrive more than 30 s
    apart."""
    key = f"mgdn_jax {name} #{next(_barriers)}"
    ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=BARRIER_TIMEOUT_MS)


def create_manager(
    directory: str | Path, *, max_to_keep: int, async_saves: bool = True
) -> ocp.CheckpointManager:
    """The run's CheckpointManager over `directory` (created if missing)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_saves, create=True
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=(STATE, DATA)
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, iterator: grain.DataLoaderIterator
) -> None:
    """Starts saving `state` and the iterator position as checkpoint `step` (asynchronous when
    the manager is; the iterator state is captured before this returns)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: grain.checkpoint.CheckpointSave(iterator),
            }
        ),
        force=True,
    )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    iterator: grain.DataLoaderIterator,
) -> Any:
    """Restores checkpoint `step`: returns the state (shaped, typed and sharded like
    `abstract_state`, a pytree of `jax.ShapeDtypeStruct`) and moves `iterator` to its saved
    position."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: grain.checkpoint.CheckpointRestore(iterator),
            }
        ),
    )
    return restored[STATE]


def export_params(
    params: nnx.State, model_config: ml_collections.ConfigDict, directory: str | Path
) -> None:
    """Writes `directory` (replacing it) as `mgdn_jax.convert.save_converted` does: params/ (an
    orbax StandardCheckpointer save of `nnx.state(model, nnx.Param)`) and config.json.

    Every process calls this (orbax saves are collective) and returns once the export is in
    place; process 0 writes the config and swaps the finished directory in, so readers never
    see a half-written export.
    """
    directory = Path(directory).absolute()
    staging = directory.with_name(directory.name + ".tmp")
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(staging, ignore_errors=True)
    barrier("export start")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging / "params", params)
    if primary:
        (staging / "config.json").write_text(model_config.to_json(indent=2))
        previous = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(previous)
        staging.rename(directory)
        shutil.rmtree(previous, ignore_errors=True)
    barrier("export done")
