"""Training (`train.py`, `mgdn_jax.train_lib`) on a tiny model and `synthetic_fusion/mff_tiny`:
checkpoints that plain orbax restores, exact resumption after SIGKILL, the same result on an
8-device mesh as on one device, a falling loss, the export that `mgdn-fuse` reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mgdn_jax.convert import load_converted

pytest.register_assert_rewrite("dataset_fixtures")
from dataset_fixtures import REPO  # noqa: E402

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
    "data.eval_dataset": "synthetic_fusion/mff_tiny",
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
    "num_samples": 2,
}


def train_command(data_dir: Path, workdir: Path, **changes) -> list[str]:
    """`python train.py` on configs/synthetic_mff.py with OVERRIDES and `changes`."""
    values = {**OVERRIDES, "data.data_dir": str(data_dir), **changes}
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={REPO / 'configs' / 'synthetic_mff.py'}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in values.items()),
    ]


def subprocess_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_CACHE_DIR", str(REPO / ".jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
    steps = sorted(int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(3, STEPS + 1, 3))
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
    losses = [r["loss"] for r in records(straight) if "loss" in r]
    assert len(losses) == STEPS
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_resume_after_sigkill_is_exact(synthetic_tiny: Path, straight: Path, tmp_path: Path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        train_command(synthetic_tiny, workdir),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
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


def test_eight_device_mesh_matches_one_device(synthetic_tiny: Path, tmp_path: Path):
    # Adam divides by sqrt(v) + eps: with a tiny eps, last-bit differences of near-zero
    # gradients (summation order across devices) become lr-sized; eps 1e-3 keeps them small.
    changes = {"total_steps": 3, "optimizer.eps": 1e-3}
    runs = {  # concurrently: compilation is mostly single-threaded
        devices: subprocess.Popen(
            train_command(synthetic_tiny, tmp_path / str(devices), **changes),
            env=subprocess_env(devices),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for devices in (1, 8)
    }
    for devices, run in runs.items():
        _, stderr = run.communicate()
        assert run.returncode == 0, stderr[-3000:]
        assert f"process 0 of 1, {devices} devices" in stderr
    one = restore_params(tmp_path / "1", 3)
    eight = restore_params(tmp_path / "8", 3, like=one)
    assert_trees_close(eight["params"], one["params"], 1e-5)
