"""Input-pipeline throughput, and the share of a CPU training step spent waiting for data.

    python bench/input_pipeline.py [--config configs/synthetic_mff.py] [--data_dir DIR]
        [--patch 128] [--global_batch 8] [--workers 0 2] [--batches 100] [--step]

Reports examples/s of `create_train_loader` for `--patch` crops with each worker count (the
default config trains on `synthetic_fusion/mff`, built on first use). With `--step`, also runs
the config's own training batches through a jitted forward + backward pass of its model and
reports how much of each step is spent in `next(iterator)`.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mgdn_jax import input_pipeline
from mgdn_jax.model import build_model

REPO = Path(__file__).resolve().parents[1]


def load_config(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def throughput(config: ml_collections.ConfigDict, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, examples/s over the next `batches` batches)."""
    start = time.perf_counter()
    iterator = iter(input_pipeline.create_train_loader(config))
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return first, batches * config.data.global_batch / (time.perf_counter() - start)


def step_wait(config: ml_collections.ConfigDict, steps: int) -> tuple[float, float]:
    """(mean step seconds, mean seconds in `next(iterator)`) of a forward + backward loop."""
    model = build_model(config.model)

    @nnx.jit
    def grad_step(model: nnx.Module, inputs: tuple[jax.Array, ...], target: jax.Array):
        def loss(model: nnx.Module) -> jax.Array:
            return jnp.abs(model(*inputs) - target).mean()

        return nnx.value_and_grad(loss)(model)

    iterator = iter(input_pipeline.create_train_loader(config))
    waits, totals = [], []
    for step in range(steps + 2):  # the first two compile and warm up
        start = time.perf_counter()
        batch = next(iterator)
        fetched = time.perf_counter()
        jax.block_until_ready(grad_step(model, batch["inputs"], batch["target"]))
        if step >= 2:
            waits.append(fetched - start)
            totals.append(time.perf_counter() - start)
    return sum(totals) / steps, sum(waits) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "synthetic_mff.py")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: the config's)")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--step", action="store_true", help="also time a CPU training loop")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    config = load_config(args.config)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    print(f"dataset {config.data.train_dataset}, {jax.device_count()} {jax.default_backend()}")
    for workers in args.workers:
        bench = ml_collections.ConfigDict(config.to_dict())
        bench.data.update(
            patch_size=args.patch, global_batch=args.global_batch, num_workers=workers
        )
        first, rate = throughput(bench, args.batches)
        print(
            f"  {args.patch}x{args.patch} crops, batch {args.global_batch}, {workers} workers: "
            f"{rate:8.1f} examples/s (first batch after {first:.1f} s)"
        )
    if args.step:
        step, wait = step_wait(config, args.steps)
        print(
            f"  training step ({config.model.variant}, batch {config.data.global_batch}, "
            f"{config.data.patch_size}x{config.data.patch_size}, "
            f"{config.data.num_workers} workers): {step * 1e3:.0f} ms, waiting for data "
            f"{wait * 1e3:.1f} ms ({100 * wait / step:.1f} %)"
        )


if __name__ == "__main__":
    main()
