"""Training MGDN: optimizer, sharded train step, and the training loop with checkpoints,
resumption, logging and periodic evaluation.

Parallelism: one `jax.sharding.Mesh` over all devices of all processes, with a `data` axis
(and optionally more, e.g. ("data", "model")). Parameters, optimizer state, step and RNG are
replicated; every batch is split along `data`, each process contributing its own share
(`jax.make_array_from_process_local_data`). One `jax.jit` train step with explicit in/out
shardings and the state donated. Parameters are always float32; `compute_dtype` bfloat16 casts
them (and the inputs) for the forward/backward pass only, losses are computed in float32.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mgdn_jax import checkpoint, evaluate, input_pipeline
from mgdn_jax.losses import default_loss_config, task_loss
from mgdn_jax.model import build_model

# {"step": () int32, "params": nnx.State (float32), "opt_state": optax state, "rng": (2,) uint32
# PRNG key, advanced every step and checkpointed for stochastic additions (the released
# architecture itself draws no random numbers)}.
TrainState = dict[str, Any]
DATA_AXIS = "data"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def training_defaults(loss_task: str) -> ml_collections.ConfigDict:
    """The training fields every `configs/<task>.py` starts from (then overrides).

    seed: model initialisation and train RNG (the data order has its own `data.seed`).
    total_steps: optimizer steps of the run.
    loss: `mgdn_jax.losses.default_loss_config()` plus `task` (mff | mef | hdr | gdsr).
    optimizer: name adam (L2 weight decay added to the gradient) or adamw (decoupled decay);
        learning_rate (peak), b1, b2, eps, weight_decay (applied to kernels / tables, not to
        biases or per-channel vectors), warmup_steps (linear from 0), schedule "cosine" (to
        final_lr_ratio x peak at total_steps) or "step" (x decay_factor at every step in
        decay_steps), grad_clip_norm (global norm; 0 turns clipping off).
    mesh: shape and axis names of the device mesh, -1 = all remaining devices; batches are
        split along "data", everything else is replicated.
    compute_dtype: "float32", or "bfloat16" (parameters stay float32).
    remat: recompute activations in the backward pass, keeping only the weight matmuls'
        outputs (less memory, more compute).
    log_every, eval_every, checkpoint_every: intervals in steps (eval/checkpoint also at the
        end; 0 turns eval off). keep_checkpoints: how many to keep. async_checkpoints: save
        in the background. num_samples: fused eval images written as PNG at every evaluation.
        fusion_metrics: also compute the no-reference fusion metrics (EN, SF, Qabf, ...) at
        evaluation (MFF / MEF, images of at least 44x44).
    """
    loss = default_loss_config()
    loss.task = loss_task
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            total_steps=100_000,
            loss=loss,
            optimizer=dict(
                name="adamw",
                learning_rate=2e-4,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                weight_decay=1e-4,
                warmup_steps=1000,
                schedule="cosine",
                final_lr_ratio=0.01,
                decay_steps=(),
                decay_factor=0.5,
                grad_clip_norm=1.0,
            ),
            mesh=dict(shape=(-1,), axes=(DATA_AXIS,)),
            compute_dtype="float32",
            remat=False,
            log_every=50,
            eval_every=5000,
            checkpoint_every=1000,
            keep_checkpoints=3,
            async_checkpoints=True,
            num_samples=4,
            fusion_metrics=False,
        )
    )


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine or step decay."""
    peak, warmup = opt.learning_rate, opt.warmup_steps
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(total_steps, warmup + 1), peak * opt.final_lr_ratio
        )
    if opt.schedule == "step":
        decay = optax.piecewise_constant_schedule(
            peak, {step - warmup: opt.decay_factor for step in opt.decay_steps}
        )
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
    raise ValueError(f"unknown schedule {opt.schedule!r}; expected 'cosine' or 'step'")


def _decay_mask(params: nnx.State) -> nnx.State:
    """True for the parameters that take weight decay: those with more than one axis."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) from `config.optimizer`."""
    schedule = learning_rate_schedule(opt, total_steps)
    decay = optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask)
    adam = optax.scale_by_adam(opt.b1, opt.b2, opt.eps)
    if opt.name == "adam":
        core = [decay, adam]
    elif opt.name == "adamw":
        core = [adam, decay]
    else:
        raise ValueError(f"unknown optimizer {opt.name!r}; expected 'adam' or 'adamw'")
    clip = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm else []
    return optax.chain(*clip, *core, optax.scale_by_learning_rate(schedule)), schedule


# ----------------------------------------------------------------------------- mesh and state


def create_mesh(mesh: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """A mesh over all devices; at most one -1 in `mesh.shape` takes the remaining ones."""
    shape, axes = list(mesh.shape), tuple(mesh.axes)
    if DATA_AXIS not in axes or len(shape) != len(axes):
        raise ValueError(f"mesh axes {axes} must name every dimension and include {DATA_AXIS!r}")
    count = jax.device_count()
    known = int(np.prod([s for s in shape if s != -1]))
    shape = [count // known if s == -1 else s for s in shape]
    if int(np.prod(shape)) != count:
        raise ValueError(f"mesh shape {tuple(mesh.shape)} does not fit {count} devices")
    return jax.make_mesh(tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes))


def init_state(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, Callable[[], TrainState]]:
    """(model graphdef, a function building the initial state); the latter is meant for
    `jax.jit` / `jax.eval_shape`."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config.model, config.seed)))

    def initial() -> TrainState:
        params = nnx.state(build_model(config.model, config.seed), nnx.Param)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(config.seed),
        }

    return graphdef, initial


# ----------------------------------------------------------------------------- train step


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step (state, batch) -> (state, scalar metrics); the state is donated.

    batch: {"inputs": tuple of (B, H, W, C_i), "target": (B, H, W, C_out) (optional)}, split
    along `data`.
    """
    dtype = COMPUTE_DTYPES[config.compute_dtype]

    def forward(params: nnx.State, inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, Any]:
        model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params))
        return model(*(x.astype(dtype) for x in inputs), return_features=True)

    if config.remat:
        forward = jax.checkpoint(
            forward, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        )

    def loss_fn(params: nnx.State, batch: dict[str, Any]) -> tuple[jax.Array, dict]:
        output, features = forward(params, batch["inputs"])
        output = output.astype(jnp.float32)
        features = jax.tree.map(lambda f: f.astype(jnp.float32), features)
        return task_loss(
            config.loss.task,
            output,
            batch.get("target"),
            list(batch["inputs"]),
            features,
            config.loss,
        )

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict]:
        grads, terms = jax.grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "rng": jax.random.fold_in(state["rng"], state["step"]),
        }
        metrics = {
            **terms,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def device_batch(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """This process's share of a batch -> global arrays split along `data` (inputs, target)."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    arrays = {key: batch[key] for key in ("inputs", "target") if key in batch}
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), arrays)


def batch_fingerprint(batch: dict[str, Any]) -> str:
    """CRC32 (hex) of the example names and input/target bytes of a host batch."""
    crc = zlib.crc32("\n".join(map(str, batch["name"])).encode())
    for array in (*batch["inputs"], batch.get("target")):
        if array is not None:
            crc = zlib.crc32(np.ascontiguousarray(array).tobytes(), crc)
    return f"{crc:08x}"


# ----------------------------------------------------------------------------- logging


class MetricLog:
    """Scalars to absl/python logging, to WORKDIR/metrics.jsonl (process 0) and, when clu's
    TensorBoard writer can be imported (the `train` extra), to TensorBoard; images to
    TensorBoard."""

    def __init__(self, workdir: Path):
        self.primary = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.writer = self._tensorboard(workdir)

    def _tensorboard(self, workdir: Path) -> Any:
        try:
            from clu import metric_writers
        except ImportError:
            logging.info("clu/TensorFlow unavailable: no TensorBoard summaries")
            return None
        return metric_writers.create_default_writer(workdir, just_logging=not self.primary)

    def scalars(
        self, step: int, values: dict[str, float], *, echo: bool = True, **extra: Any
    ) -> None:
        """Appends {"step", **values, **extra} to metrics.jsonl; with `echo`, also logs the
        values and writes them to TensorBoard."""
        if self.primary:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values, **extra}) + "\n")
        if not echo:
            return
        logging.info("step %d: %s", step, ", ".join(f"{k} {v:.5g}" for k, v in values.items()))
        if self.writer is not None:
            self.writer.write_scalars(step, values)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        if self.writer is not None and images:
            self.writer.write_images(step, {k: v[None] for k, v in images.items()})

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()


class _Stop:
    """Set by SIGTERM: the loop saves a checkpoint at the next step and returns."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the latest checkpoint is the last good one."""


# ----------------------------------------------------------------------------- loop


def _abstract_state(initial: Callable[[], TrainState], mesh: jax.sharding.Mesh) -> TrainState:
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(initial),
    )


def _write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def _local_params(params: nnx.State) -> nnx.State:
    """Replicated global params -> this process's (single-device) copy."""
    return jax.tree.map(lambda x: x.addressable_data(0), params)


class _Pending:
    """Per-step metrics kept on device until the next log / checkpoint, so that steps are
    dispatched without waiting; `drain` fetches them and checks the loss."""

    def __init__(self) -> None:
        self.items: list[tuple[int, dict[str, jax.Array], str]] = []

    def add(self, step: int, metrics: dict[str, jax.Array], fingerprint: str) -> None:
        self.items.append((step, metrics, fingerprint))

    def drain(self) -> list[tuple[int, dict[str, float], str]]:
        fetched = [
            (step, {k: float(v) for k, v in jax.device_get(m).items()}, fp)
            for step, m, fp in self.items
        ]
        self.items = []
        for step, metrics, _ in fetched:
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss {metrics['loss']} at step {step}; stopping. The latest "
                    "checkpoint (if any) is the last good one."
                )
        return fetched


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Trains (resuming from `workdir`'s latest checkpoint if any) up to `config.total_steps`,
    or until SIGTERM; returns the final state. Raises NonFiniteLossError on a NaN/inf loss."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
    mesh = create_mesh(config.mesh)
    tx, schedule = create_optimizer(config.optimizer, config.total_steps)
    graphdef, initial = init_state(config, tx)
    log = MetricLog(workdir)
    manager = checkpoint.create_manager(
        workdir / "checkpoints",
        max_to_keep=config.keep_checkpoints,
        async_saves=config.async_checkpoints,
    )
    iterator = iter(input_pipeline.create_train_loader(config))
    latest = manager.latest_step()
    if latest is None:
        state = jax.jit(initial, out_shardings=NamedSharding(mesh, P()))()
        logging.info("initialised a new run in %s", workdir)
    else:
        state = checkpoint.restore(manager, latest, _abstract_state(initial, mesh), iterator)
        logging.info("resumed from step %d of %s", latest, workdir)
    train_step = make_train_step(config, graphdef, tx, schedule, mesh)
    step = int(jax.device_get(state["step"]))
    pending = _Pending()
    stop = _Stop()
    last_time, last_step = time.perf_counter(), step
    data_wait = 0.0  # seconds blocked on the input pipeline since the last log line
    try:
        while step < config.total_steps:
            wait_start = time.perf_counter()
            batch = next(iterator)
            data_wait += time.perf_counter() - wait_start
            fingerprint = batch_fingerprint(batch)
            state, metrics = train_step(state, device_batch(batch, mesh))
            step += 1
            pending.add(step, metrics, fingerprint)
            final = step == config.total_steps
            stopping = stop.requested or manager.reached_preemption(step)
            saving = final or stopping or step % config.checkpoint_every == 0
            evaluating = config.eval_every and (final or step % config.eval_every == 0)
            if saving or evaluating or step % config.log_every == 0:
                fetched = pending.drain()
                now = time.perf_counter()
                rate = (step - last_step) / (now - last_time)
                timing = {
                    "steps_per_sec": rate,
                    "data_wait_fraction": data_wait / (now - last_time),
                }
                last_time, last_step, data_wait = now, step, 0.0
                for s, values, fp in fetched:
                    log.scalars(s, {**values, **timing}, echo=s == step, batch=fp)
            if saving:
                checkpoint.save(manager, step, state, iterator)
            if evaluating:
                run_evaluation(config, graphdef, state["params"], workdir, step, log)
                last_time = time.perf_counter()
            if stopping:
                break
    finally:
        stop.restore()
        manager.wait_until_finished()
        manager.close()
        log.flush()
    if step == config.total_steps and not config.eval_every:
        checkpoint.export_params(state["params"], config.model, workdir / "export")
    return state


def run_evaluation(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    workdir: Path,
    step: int,
    log: MetricLog,
) -> dict[str, float]:
    """Evaluates on `config.data.eval_dataset`, writes sample PNGs to WORKDIR/samples/STEP/,
    logs the metrics (averaged over all processes' images) and exports the parameters."""
    model = nnx.merge(graphdef, _local_params(params))
    samples = workdir / "samples" / f"{step:08d}"
    result = evaluate.evaluate(
        model,
        config,
        sample_dir=samples,
        num_samples=config.num_samples,
        fusion_metrics=config.fusion_metrics,
    )
    totals = {k: np.float64(v * result.count) for k, v in result.metrics.items()}
    totals["count"] = np.float64(result.count)
    totals = jax.tree.map(lambda x: float(np.sum(multihost_utils.process_allgather(x))), totals)
    count = max(totals.pop("count"), 1.0)
    metrics = {f"eval/{k}": v / count for k, v in totals.items()}
    log.scalars(step, metrics)
    log.images(step, result.samples)
    checkpoint.export_params(params, config.model, workdir / "export")
    return metrics
