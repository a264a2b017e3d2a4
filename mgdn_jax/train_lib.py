"""Training MGDN: optimizer, sharded train step, and the training loop with checkpoints,
resumption, logging and periodic evaluation.

Parallelism: one `jax.sharding.Mesh` over all devices of all processes, with a `data` axis
(and optionally more, e.g. ("data", "model")). Parameters, optimizer state, step and RNG are
replicated; every batch is split along `data`, each process contributing its own share
(`jax.make_array_from_process_local_data`). One `jax.jit` train step with explicit in/out
shardings and the state donated. Parameters are always float32; `compute_dtype` bfloat16 casts
them (and the inputs) for the forward/backward pass only, losses are computed in float32.

Logging: the step's scalars accumulate on device in a clu metrics Collection between log steps;
clu's default writer logs them (TensorBoard event files in the workdir and log lines), clu's
periodic actions report progress and optionally profile. clu's writers and periodic actions
import TensorFlow (the `train` extra), so they are imported by the training loop only: the
configs import this module, and `mgdn-eval` reads the configs.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mgdn_jax import checkpoint, evaluate, input_pipeline, runtime
from mgdn_jax.errors import UserError, make_directory
from mgdn_jax.losses import default_loss_config, task_loss
from mgdn_jax.model import build_model

if TYPE_CHECKING:
    from clu import metric_writers, periodic_actions

# {"step": () int32, "params": nnx.State (float32), "opt_state": optax state, "rng": (2,) uint32
# PRNG key, split every step for the model's stochastic depth and checkpointed, and with
# `ema_decay` > 0 "ema": nnx.State, the moving average of "params"}.
TrainState = dict[str, Any]
# (state, batch) -> (state, scalar metrics): `make_train_step`'s jitted step, or it compiled.
TrainStep = Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]
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
    remat: keep only the inputs of every MGDF and transformer block for the backward pass,
        which recomputes their activations (less memory, about a third more compute).
    ema_decay: > 0 keeps an exponential moving average of the parameters, updated after every
        step as ema = d ema + (1 - d) params from a copy of the initial ones (the release's
        fusion training keeps one, its "E" network, and ships those weights); evaluation and
        the export then use it. 0: off.
    log_every, eval_every, checkpoint_every: intervals in steps (eval/checkpoint also at the
        end; 0 turns eval off). keep_checkpoints: how many to keep. async_checkpoints: save
        in the background.
    eval: evaluation during training and by `mgdn-eval` (`mgdn_jax.evaluate`): dataset and
        split (each config sets the dataset); pad, "official" (the release's inference procedure
        for the task, `inference.run`) or "model" (the network's reflect padding only);
        fusion_metrics: also the no-reference fusion metrics (EN, SF, Qabf, ...) on MFF / MEF
        sets with a reference (always computed on sets without one; images of at least
        44x44); num_samples: fused images written as PNG (WORKDIR/samples/STEP) and logged at
        every evaluation during training; save_outputs: `mgdn-eval` writes every fused image.
    weights: the weights `mgdn-eval` evaluates (an official .pth or a converted / exported
        directory); unused by training.
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
            ema_decay=0.0,
            profile_steps=0,
            profile_first_step=10,
            log_every=50,
            eval_every=5000,
            checkpoint_every=1000,
            keep_checkpoints=3,
            async_checkpoints=True,
            eval=dict(
                dataset=ml_collections.config_dict.placeholder(str),
                split="test",
                pad="official",
                fusion_metrics=False,
                num_samples=4,
                save_outputs=True,
            ),
            weights=ml_collections.config_dict.placeholder(str),
        )
    )


# ----------------------------------------------------------------------------- optimizer


def apply_release_fusion_training(config: ml_collections.ConfigDict) -> None:
    """What the release's fusion training code (`models/model_plain.py`) fixes: Adam without
    weight decay, no gradient clipping unless its (unshipped) options ask, and a moving average
    of the weights, the "E" network its inference scripts load (decay 0.999, the default of
    the KAIR framework it builds on). Its milestones, loss modules and options files are not
    shipped; the schedule stays this project's."""
    config.optimizer.update(name="adam", weight_decay=0.0, grad_clip_norm=0.0)
    config.ema_decay = 0.999


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
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(config.seed),
        }
        if config.ema_decay > 0:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    return graphdef, initial


# ----------------------------------------------------------------------------- train step


def train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> TrainStep:
    """The step (state, batch) -> (state, scalar metrics), not jitted (`make_train_step`).

    batch: {"inputs": tuple of (B, H, W, C_i), "target": (B, H, W, C_out) (optional)}.
    """
    dtype = COMPUTE_DTYPES[config.compute_dtype]

    def forward(
        params: nnx.State, inputs: tuple[jax.Array, ...], key: jax.Array
    ) -> tuple[jax.Array, Any]:
        model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params))
        return model(
            *(x.astype(dtype) for x in inputs),
            return_features=True,
            remat=config.remat,
            dropout_key=key,
        )

    def loss_fn(params: nnx.State, batch: dict[str, Any], key: jax.Array) -> tuple[jax.Array, dict]:
        output, features = forward(params, batch["inputs"], key)
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
        dropout_key, rng = jax.random.split(state["rng"])
        grads, terms = jax.grad(loss_fn, has_aux=True)(state["params"], batch, dropout_key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "rng": rng,
        }
        if "ema" in state:
            new_state["ema"] = optax.incremental_update(
                new_state["params"], state["ema"], 1.0 - config.ema_decay
            )
        metrics = {
            **terms,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    return step


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
) -> TrainStep:
    """`train_step` jitted over `mesh`: the state replicated and donated, the batch split along
    `data`, the metrics replicated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step(config, graphdef, tx, schedule),
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
    """clu's default metric writer and WORKDIR/metrics.jsonl.

    Process 0 writes TensorBoard event files into the workdir and log lines, the others log
    lines only. Process 0 also appends every `scalars` call and every `record` to metrics.jsonl,
    one JSON object per line.
    """

    def __init__(self, workdir: Path):
        from clu import metric_writers  # imports TensorFlow: the `train` extra

        self.primary = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.primary)

    def record(self, step: int, **fields: Any) -> None:
        """Appends {"step": step, **fields} to metrics.jsonl."""
        if self.primary:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **fields}) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """To metrics.jsonl, the log and TensorBoard."""
        self.record(step, **values)
        self.writer.write_scalars(step, values)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """(H, W, C) uint8 images to TensorBoard."""
        if images:
            self.writer.write_images(step, {k: v[None] for k, v in images.items()})

    def close(self) -> None:
        """Flushes and closes the writer."""
        self.writer.close()


def metric_collection(names: Iterable[str]) -> type[clu_metrics.Collection]:
    """A clu Collection of the train step's scalars `names`: the mean of each over the steps
    it accumulates, except `learning_rate`, of which it keeps the last value."""

    def kind(name: str) -> type[clu_metrics.Metric]:
        return clu_metrics.LastValue if name == "learning_rate" else clu_metrics.Average

    return clu_metrics.Collection.create(**{name: kind(name).from_output(name) for name in names})


@functools.partial(jax.jit, static_argnums=0)
def _accumulate(
    kind: type[clu_metrics.Collection],
    collection: clu_metrics.Collection | None,
    metrics: dict[str, jax.Array],
) -> clu_metrics.Collection:
    """`collection` (None: nothing yet) merged with one step's scalar `metrics`."""
    update = kind.single_from_model_output(**metrics)
    return update if collection is None else collection.merge(update)


@jax.jit
def _compute(collection: clu_metrics.Collection) -> dict[str, jax.Array]:
    return collection.compute()


class TrainMetrics:
    """The train steps' metrics since the last log, kept on device so that steps are dispatched
    without waiting: a clu Collection accumulates their averages, and every step's scalars wait,
    with its batch fingerprint, for their per-step record."""

    def __init__(self) -> None:
        self.kind: type[clu_metrics.Collection] | None = None
        self.collection: clu_metrics.Collection | None = None
        self.steps: list[tuple[int, dict[str, jax.Array], str]] = []

    def add(self, step: int, metrics: dict[str, jax.Array], fingerprint: str) -> None:
        """Accumulates the scalar `metrics` of `step`, whose batch has `fingerprint`."""
        if self.kind is None:
            self.kind = metric_collection(metrics)
        self.collection = _accumulate(self.kind, self.collection, metrics)
        self.steps.append((step, metrics, fingerprint))

    def drain(self) -> tuple[dict[str, float], list[tuple[int, dict[str, float], str]]]:
        """(the averages, [(step, its scalars, its batch fingerprint)]) of the steps added since
        the last call. Raises NonFiniteLossError naming the first step whose loss is NaN or
        infinite."""
        averages, values = jax.device_get(
            (_compute(self.collection), [metrics for _, metrics, _ in self.steps])
        )
        steps = [
            (step, {k: float(v) for k, v in metrics.items()}, fingerprint)
            for (step, _, fingerprint), metrics in zip(self.steps, values)
        ]
        self.collection, self.steps = None, []
        for step, metrics, _ in steps:
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss {metrics['loss']} at step {step}; stopping. The latest "
                    "checkpoint (if any) is the last good one."
                )
        return {k: float(v) for k, v in averages.items()}, steps


def _log_window(log: MetricLog, window: TrainMetrics, step: int) -> None:
    """Drains `window`: a metrics.jsonl record per step, the averages as train/NAME at `step`."""
    averages, steps = window.drain()
    for s, values, fingerprint in steps:
        log.record(s, **values, batch=fingerprint)
    log.scalars(step, {f"train/{name}": value for name, value in averages.items()})


def _periodic_actions(
    config: ml_collections.ConfigDict, workdir: Path, writer: metric_writers.MetricWriter
) -> tuple[periodic_actions.ReportProgress, list[periodic_actions.PeriodicAction]]:
    """clu's ReportProgress (every `log_every` steps: steps/s, ETA and the share of time spent
    waiting for data and evaluating) and, if `profile_steps` > 0, a Profile of that many steps
    from step `profile_first_step` into WORKDIR/plugins/profile (TensorBoard's profile tab)."""
    from clu import periodic_actions  # imports TensorFlow: the `train` extra

    progress = periodic_actions.ReportProgress(
        num_train_steps=config.total_steps,
        writer=writer,
        every_steps=config.log_every,
        every_secs=None,
    )
    actions = [progress]
    if config.get("profile_steps", 0):
        actions.append(
            periodic_actions.Profile(
                logdir=workdir,
                num_profile_steps=config.profile_steps,
                profile_duration_ms=None,
                first_profile=config.get("profile_first_step", 10),
                every_secs=None,
            )
        )
    return progress, actions


class _Stop:
    """SIGTERM in a single-process run: the loop saves a checkpoint at the next step and
    returns. With several processes JAX's preemption service receives SIGTERM, and
    `CheckpointManager.reached_preemption` stops them all at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None
        if jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the latest checkpoint is the last good one."""


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


def _compile_on_all_processes(
    train_step: TrainStep, state: TrainState, batch: dict[str, Any]
) -> TrainStep:
    """`train_step` compiled for `state` and `batch`, once every process has compiled it: CPU
    collectives (gloo) fail when the processes reach their first collective more than 30 s
    apart, and compile times differ."""
    compiled = train_step.lower(state, batch).compile()
    runtime.release_memory()
    checkpoint.barrier("train step compiled")
    return compiled


def check_train_config(config: ml_collections.ConfigDict) -> None:
    """One-line `UserError`s for values training cannot run with: the compute dtype, the patch
    size and batch, the loader's worker / thread / buffer counts, an unknown or unbuilt
    training dataset."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        known = ", ".join(COMPUTE_DTYPES)
        raise UserError(f"compute_dtype {config.compute_dtype!r}: expected one of {known}")
    input_pipeline.check_counts(config.data, 1, "patch_size", "global_batch")
    input_pipeline.check_loader_config(config.data)
    evaluate.check_dataset(config.data.train_dataset, config.data.data_dir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Trains (resuming from `workdir`'s latest checkpoint if any) up to `config.total_steps`,
    or until SIGTERM; returns the final state. Raises NonFiniteLossError on a NaN/inf loss, and
    UserError, before writing anything, for a config `check_train_config` rejects or a workdir
    that cannot be made or written to."""
    check_train_config(config)
    workdir = make_directory(workdir)
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
    compiled = None
    step = int(jax.device_get(state["step"]))
    window = TrainMetrics()
    progress, actions = _periodic_actions(config, workdir, log.writer)
    stop = _Stop()
    try:
        while step < config.total_steps:
            with progress.timed("data", wait_jax_async_dispatch=False):
                batch = next(iterator)
            fingerprint = batch_fingerprint(batch)
            arrays = device_batch(batch, mesh)
            if compiled is None:
                compiled = _compile_on_all_processes(train_step, state, arrays)
            state, metrics = compiled(state, arrays)
            step += 1
            window.add(step, metrics, fingerprint)
            final = step == config.total_steps
            stopping = stop.requested or manager.reached_preemption(step)
            saving = final or stopping or step % config.checkpoint_every == 0
            evaluating = config.eval_every and (final or step % config.eval_every == 0)
            if saving or evaluating or step % config.log_every == 0:
                _log_window(log, window, step)
            for action in actions:
                action(step)
            if saving:
                checkpoint.save(manager, step, state, iterator)
            if evaluating:
                with progress.timed("eval"):
                    run_evaluation(config, graphdef, inference_params(state), workdir, step, log)
            if stopping:
                break
    finally:
        stop.restore()
        manager.wait_until_finished()
        manager.close()
        log.close()
    if step == config.total_steps and not config.eval_every:
        checkpoint.export_params(inference_params(state), config.model, workdir / "export")
    return state


def inference_params(state: TrainState) -> nnx.State:
    """The parameters to evaluate and export: the moving average if the run keeps one."""
    return state.get("ema", state["params"])


def run_evaluation(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    workdir: Path,
    step: int,
    log: MetricLog,
) -> dict[str, float]:
    """Evaluates on `config.eval.dataset` (`evaluate.evaluate`, every process its share): writes
    the first `config.eval.num_samples` outputs of each process to WORKDIR/samples/STEP/, and
    from process 0 the per-image and mean metrics of all images to
    WORKDIR/eval/<dataset>_<split>/step_STEP/results.{json,csv}; logs the means and exports
    the parameters."""
    model = nnx.merge(graphdef, _local_params(params))
    num_samples = config.eval.num_samples
    result = evaluate.evaluate(
        model,
        config,
        output_dir=workdir / "samples" / f"{step:08d}",
        num_outputs=num_samples,
        num_samples=num_samples,
    )
    if jax.process_index() == 0:
        directory = evaluate.results_dir(workdir, config) / f"step_{step:08d}"
        evaluate.write_results(result, directory, {"step": step})
    metrics = {f"eval/{k}": v for k, v in result.mean.items()}
    log.scalars(step, metrics)
    log.images(step, result.samples)
    checkpoint.export_params(params, config.model, workdir / "export")
    return metrics
