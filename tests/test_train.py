"""Training (`train.py`, `mgdn_jax.train_lib`) on a tiny model and `synthetic_fusion/mff_tiny`:
checkpoints that plain orbax restores, exact resumption after SIGKILL, a checkpoint on SIGTERM,
a stop at a non-finite loss, the same result on an 8-device mesh and on two processes with 4
devices each as on one process, bfloat16 compute and rematerialisation, a falling loss,
TensorBoard summaries, the export that `mgdn-fuse` reads."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from dataset_fixtures import REPO
from flax import nnx

from mgdn_jax import train_lib
from mgdn_jax.convert import load_converted
from mgdn_jax.errors import UserError, make_directory

pytest_plugins = ["dataset_fixtures"]

STEPS = 18
# A tiny MGDN on 16x16 patches, batches of 8 (one example per device on an 8-device mesh).
OVERRIDES = {
    "model.embed_dim": 12,
    "model.depths": (1, 1),
    "model.num_heads": (2, 2),
    "model.window_size": 4,
    "model.mgca_heads": 6,
    "data.train_dataset": "synthetic_fusion/mff_tiny",
    "data.patch_size": 16,
    "data.global_batch": 8,
    "total_steps": STEPS,
    "optimizer.learning_rate": 3e-3,
    "optimizer.schedule": "step",  # constant after warm-up: the same for any total_steps
    "optimizer.warmup_steps": 2,
    "log_every": 1,
    "checkpoint_every": 3,
    "keep_checkpoints": 10,
    "eval_every": 0,
    "eval.dataset": "synthetic_fusion/mff_tiny",
    "eval.num_samples": 2,
}


def train_command(
    data_dir: Path, workdir: Path, *, script: Path = REPO / "train.py", **changes
) -> list[str]:
    """`python train.py` (or `script`) on configs/synthetic_mff.py with OVERRIDES and
    `changes`."""
    values = {**OVERRIDES, "data.data_dir": str(data_dir), **changes}
    return [
        sys.executable,
        str(script),
        f"--config={REPO / 'configs' / 'synthetic_mff.py'}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in values.items()),
    ]


def subprocess_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_CACHE_DIR", str(REPO / ".jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    # LLVM's optimisation level 0: these tiny runs are compilation-bound (the train step of the
    # tiny model compiles in 18 s instead of 26 s, and a step takes 0.35 s instead of 0.07 s).
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    )
    # What train.py would re-execute itself with (runtime.use_huge_pages), set up front so
    # that every run saves the second interpreter start.
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    return env


def restore_params(workdir: Path, step: int, like: dict | None = None) -> dict:
    """Checkpoint `step` of a run, read with plain orbax (no project code); `like`, a tree of
    the same structure, gives the target (needed when the run used other devices)."""
    target = None
    if like is not None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like
        )
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",)) as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    return restored["state"]


def records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(workdir: Path) -> list[float]:
    """The per-step losses in metrics.jsonl."""
    return [r["loss"] for r in records(workdir) if "loss" in r]


def fingerprints(workdir: Path) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    for record in records(workdir):
        if "batch" in record:
            seen.setdefault(record["step"], set()).add(record["batch"])
    return seen


def assert_trees_close(a, b, atol: float) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    worst = max(
        float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def straight(synthetic_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STEPS steps, evaluated at the end. A subprocess like the runs
    it is compared with: the same compiled program gives bit-identical results."""
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(
        train_command(synthetic_tiny, workdir, eval_every=STEPS),
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    return workdir


def test_checkpoints_restore_with_plain_orbax(straight: Path):
    assert checkpoint_steps(straight) == list(range(3, STEPS + 1, 3))
    state = restore_params(straight, STEPS)
    assert int(state["step"]) == STEPS
    assert set(state) == {"step", "params", "opt_state", "rng"}
    model, cfg = load_converted(straight / "export")
    assert cfg.embed_dim == 12
    exported = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(x, y)
    assert (straight / "config.json").is_file()
    assert len(list((straight / "samples" / f"{STEPS:08d}").glob("*.png"))) == 2


def test_loss_falls(straight: Path):
    values = losses(straight)
    assert len(values) == STEPS
    assert np.mean(values[-4:]) < 0.8 * np.mean(values[:4]), values


def test_resume_after_sigkill_is_exact(synthetic_tiny: Path, straight: Path, tmp_path: Path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        train_command(synthetic_tiny, workdir),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not (workdir / "checkpoints" / "3").is_dir():
        assert first.poll() is None and time.monotonic() < deadline, "no step-3 checkpoint"
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = max(fingerprints(workdir))
    assert not (workdir / "checkpoints" / str(STEPS)).exists(), "the run was not interrupted"
    subprocess.run(
        train_command(synthetic_tiny, workdir),
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    seen = fingerprints(workdir)
    expected = {step: fp for step, (fp,) in fingerprints(straight).items()}
    assert sorted(seen) == list(range(1, STEPS + 1)) and killed_at < STEPS
    assert {step: fps for step, fps in seen.items()} == {s: {fp} for s, fp in expected.items()}
    assert_trees_close(restore_params(workdir, STEPS), restore_params(straight, STEPS), 0.0)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def exported(workdir: Path) -> dict:
    """The parameters in WORKDIR/export."""
    model, _ = load_converted(workdir / "export")
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def start(command: list[str], devices: int, log: Path) -> subprocess.Popen:
    """Starts `command` on `devices` CPU devices, with its stderr going to `log`."""
    with log.open("w") as stderr:
        return subprocess.Popen(
            command, env=subprocess_env(devices), stdout=subprocess.DEVNULL, stderr=stderr
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_all(runs: dict[str, subprocess.Popen], logs: Path, timeout: float) -> None:
    """Waits for `runs` (stderr in LOGS/NAME.log), killing all of them past `timeout` seconds
    or when one fails: their collectives would wait for it forever."""
    deadline = time.monotonic() + timeout
    try:
        while any(run.poll() is None for run in runs.values()):
            failed = [name for name, run in runs.items() if run.poll() not in (None, 0)]
            assert not failed and time.monotonic() < deadline, f"{failed or 'timeout'}"
            time.sleep(0.1)
    except AssertionError as e:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
        tails = {name: (logs / f"{name}.log").read_text()[-2000:] for name in runs}
        raise AssertionError(f"{e}: {tails}") from None
    for name, run in runs.items():
        assert run.returncode == 0, (logs / f"{name}.log").read_text()[-3000:]


# Adam divides by sqrt(v) + eps, so last-bit differences of near-zero gradients (the summation
# order differs across devices and with rematerialisation, and the NMI loss's sharp kernel
# magnifies them) become lr-sized updates. Measured on the 8- vs 1-device runs (3 steps, random
# batch): eps 1e-8 -> 4.5e-3, 1e-3 -> 1e-4, 1e-2 -> 1.6e-4, 1e-1 -> 1.7e-6, 1 (SGD-like) ->
# 1e-7. eps 0.1 compares what sharding changes, the gradients, to rounding.
THREE_STEPS = {"total_steps": 3, "optimizer.eps": 0.1}
# The runs of `three_steps`: devices and config changes.
VARIANTS = {
    "1": (1, {}),
    "8": (8, {}),
    "remat": (1, {"remat": True}),
    "bfloat16": (1, {"compute_dtype": "bfloat16"}),
    "ema": (1, {"ema_decay": 0.5, "checkpoint_every": 1}),
}


@pytest.fixture(scope="module")
def three_steps(synthetic_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Workdirs of THREE_STEPS runs of the VARIANTS, run concurrently: compilation is mostly
    single-threaded."""
    root = tmp_path_factory.mktemp("three_steps")
    runs = {
        name: start(
            train_command(synthetic_tiny, root / name, **THREE_STEPS, **changes),
            devices,
            root / f"{name}.log",
        )
        for name, (devices, changes) in VARIANTS.items()
    }
    wait_all(runs, root, timeout=900)
    for name, (devices, _) in VARIANTS.items():
        assert f"process 0 of 1, {devices} devices" in (root / f"{name}.log").read_text()
    return {name: root / name for name in VARIANTS}


def test_eight_device_mesh_matches_one_device(three_steps: dict[str, Path]):
    one = restore_params(three_steps["1"], 3)
    eight = restore_params(three_steps["8"], 3, like=one)
    assert_trees_close(eight["params"], one["params"], 1e-5)
    # The export of a multi-device run loads on one device.
    for x, y in zip(jax.tree.leaves(exported(three_steps["8"])), jax.tree.leaves(eight["params"])):
        np.testing.assert_array_equal(x, y)


def test_bfloat16_compute_keeps_float32_params(three_steps: dict[str, Path]):
    params = jax.tree.leaves(restore_params(three_steps["bfloat16"], 3)["params"])
    assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in params)
    bfloat16 = losses(three_steps["bfloat16"])
    assert np.isfinite(bfloat16).all()
    np.testing.assert_allclose(bfloat16, losses(three_steps["1"]), rtol=0.02)


def test_remat_gives_the_same_params(three_steps: dict[str, Path]):
    np.testing.assert_allclose(losses(three_steps["remat"]), losses(three_steps["1"]), rtol=1e-6)
    remat = restore_params(three_steps["remat"], 3)
    assert_trees_close(remat["params"], restore_params(three_steps["1"], 3)["params"], 1e-5)


def test_moving_average_is_kept_checkpointed_and_exported(three_steps: dict[str, Path]):
    """ema_decay d: the training itself is unchanged, every checkpoint holds
    ema_k = d ema_(k-1) + (1 - d) params_k, and the export is the average, not the params."""
    plain = restore_params(three_steps["1"], 3)
    states = {k: restore_params(three_steps["ema"], k) for k in (1, 2, 3)}
    assert set(states[3]) == {"step", "params", "opt_state", "rng", "ema"}
    assert_trees_close(states[3]["params"], plain["params"], 1e-6)
    for k in (2, 3):
        expected = jax.tree.map(
            lambda e, p: 0.5 * e + 0.5 * p, states[k - 1]["ema"], states[k]["params"]
        )
        assert_trees_close(states[k]["ema"], expected, 1e-7)
    for x, y in zip(
        jax.tree.leaves(exported(three_steps["ema"])), jax.tree.leaves(states[3]["ema"])
    ):
        np.testing.assert_array_equal(x, y)
    ema, params = jax.tree.leaves(states[3]["ema"]), jax.tree.leaves(states[3]["params"])
    assert not all(np.array_equal(e, p) for e, p in zip(ema, params))


def test_two_processes_match_one_process(synthetic_tiny: Path, tmp_path: Path):
    """Two processes of 4 devices each, joined by jax.distributed with gloo CPU collectives and
    each reading only its shard of the data, train as one process of 8 devices does on the
    global batches the two shards make (tests/shard_reference.py)."""
    distributed = [f"--coordinator_address=localhost:{free_port()}", "--num_processes=2"]
    commands = {
        f"process_{i}": train_command(synthetic_tiny, tmp_path / "two", **THREE_STEPS)
        + [*distributed, f"--process_id={i}"]
        for i in range(2)
    }
    reference = REPO / "tests" / "shard_reference.py"
    commands["reference"] = train_command(
        synthetic_tiny, tmp_path / "one", script=reference, **THREE_STEPS
    ) + ["--shards=2"]
    devices = {"process_0": 4, "process_1": 4, "reference": 8}
    runs = {
        name: start(command, devices[name], tmp_path / f"{name}.log")
        for name, command in commands.items()
    }
    wait_all(runs, tmp_path, timeout=900)
    assert "process 1 of 2, 8 devices" in (tmp_path / "process_1.log").read_text()
    assert_trees_close(exported(tmp_path / "two"), exported(tmp_path / "one"), 1e-5)
    shard_0 = json.loads((tmp_path / "one" / "fingerprints.json").read_text())
    assert fingerprints(tmp_path / "two") == {s: {fp} for s, fp in enumerate(shard_0, start=1)}
    assert checkpoint_steps(tmp_path / "two") == [3]


def test_sigterm_saves_and_resume_continues(synthetic_tiny: Path, straight: Path, tmp_path: Path):
    workdir = tmp_path / "run"
    log = tmp_path / "run.log"
    run = start(train_command(synthetic_tiny, workdir, total_steps=1000), 1, log)
    try:
        deadline = time.monotonic() + 600
        while not (workdir / "metrics.jsonl").is_file():
            assert run.poll() is None and time.monotonic() < deadline, "no step logged"
            time.sleep(0.01)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "SIGTERM: saving a checkpoint and stopping" in log.read_text()
    reached = max(fingerprints(workdir))
    assert checkpoint_steps(workdir)[-1] == reached < STEPS - 2
    assert int(restore_params(workdir, reached)["step"]) == reached
    resumed = subprocess.run(
        train_command(synthetic_tiny, workdir, total_steps=reached + 2),
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {reached} " in resumed.stderr
    seen = fingerprints(workdir)
    expected = fingerprints(straight)
    assert seen == {step: expected[step] for step in range(1, reached + 3)}


def test_non_finite_loss_stops_at_last_good_checkpoint(synthetic_tiny: Path, tmp_path: Path):
    workdir = tmp_path / "run"
    changes = {"optimizer.learning_rate": 1e30, "checkpoint_every": 1}
    result = subprocess.run(
        train_command(synthetic_tiny, workdir, **changes),
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    (message,) = [line for line in result.stderr.splitlines() if "non-finite loss" in line]
    bad = int(re.search(r"at step (\d+);", message).group(1))
    assert 1 < bad < STEPS
    assert checkpoint_steps(workdir) == list(range(1, bad))
    params = restore_params(workdir, bad - 1)["params"]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert len(losses(workdir)) == bad - 1 and np.isfinite(losses(workdir)).all()


def test_tensorboard_summaries(straight: Path):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    (events,) = straight.glob("events.out.tfevents.*")
    summaries = event_accumulator.EventAccumulator(
        str(events), size_guidance={event_accumulator.TENSORS: 0}
    )
    summaries.Reload()

    def scalars(tag: str) -> dict[int, float]:
        return {
            e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in summaries.Tensors(tag)
        }

    logged = scalars("train/loss")  # log_every 1: the average of one step
    assert sorted(logged) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([logged[s] for s in sorted(logged)], losses(straight), rtol=1e-6)
    assert sorted(scalars("steps_per_sec")) == list(range(2, STEPS + 1))
    assert set(scalars("eval/psnr")) == {STEPS}
    tags = summaries.Tags()["tensors"]
    images = [t for t in tags if summaries.SummaryMetadata(t).plugin_data.plugin_name == "images"]
    assert len(images) == 2
    assert len(list((straight / "samples" / f"{STEPS:08d}").glob("*.png"))) == 2


def test_train_metrics_average_the_window():
    window = train_lib.TrainMetrics()
    for step, loss in enumerate([1.0, 2.0, 6.0], start=1):
        metrics = {"loss": jnp.float32(loss), "learning_rate": jnp.float32(step / 10)}
        window.add(step, metrics, f"batch{step}")
    averages, steps = window.drain()
    assert averages == pytest.approx({"loss": 3.0, "learning_rate": 0.3})
    assert [(s, fp) for s, _, fp in steps] == [(1, "batch1"), (2, "batch2"), (3, "batch3")]
    assert steps[2][1] == pytest.approx({"loss": 6.0, "learning_rate": 0.3})
    for step, loss in ((4, 1.0), (5, np.nan)):
        window.add(step, {"loss": jnp.float32(loss), "learning_rate": jnp.float32(0)}, "b")
    with pytest.raises(train_lib.NonFiniteLossError, match="at step 5;"):
        window.drain()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"nosuch": 3}, "error: unknown config field 'nosuch' in a --config override"),
        ({"compute_dtype": "foo"}, "error: compute_dtype 'foo': expected one of float32, bfloat16"),
        ({"file": "nope.py"}, "error: --config: [Errno 2] No such file or directory: 'nope.py'"),
        ({"file": None, "nosuch": 3}, "error: unknown config field 'nosuch' in a --config"),
        ({"data.patch_size": 0}, "error: data.patch_size must be a positive integer, got 0"),
        ({"data.read_threads": -1}, "error: data.read_threads must be an integer >= 0, got -1"),
        ({"data.train_dataset": "nosuch"}, "error: unknown dataset 'nosuch'; the MGDN datasets"),
    ],
)
def test_bad_config_is_one_error(tmp_path: Path, change: dict, message: str):
    """A missing config file, an override of an unknown field (also of the default config, with
    no --config) or a bad value: one error line, exit status 2, and no workdir made."""
    workdir = tmp_path / "run"
    config_file = change.pop("file", "")
    command = train_command(tmp_path / "data", workdir, **change)
    if config_file != "":
        replaced = [] if config_file is None else [f"--config={config_file}"]
        command = [a for c in command for a in (replaced if c.startswith("--config=") else [c])]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not workdir.exists()


def test_unusable_workdir_is_one_error(synthetic_tiny: Path, tmp_path: Path, monkeypatch):
    """A workdir that is a file, or cannot be written to: one error line naming it, exit
    status 2, before anything is written."""
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    command = train_command(synthetic_tiny, workdir)
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        result.stderr.strip().splitlines()[-1] == f"error: {workdir}: cannot create (File exists)"
    )
    assert workdir.read_text() == "not a directory"

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != readonly)
    with pytest.raises(UserError, match=f"^{readonly}: not writable$"):
        make_directory(readonly)
    assert make_directory(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert (tmp_path / "new" / "run").is_dir()
