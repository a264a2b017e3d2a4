"""The masked NMI loss: every way of counting its joint histograms (`mgdn_jax.losses.
JOINT_COUNTS`), forward and forward + backward, per width and training-patch size.

    python bench/nmi.py [--counts dense scattered] [--widths 30 60] [--sizes 128 256]
        [--batch 4] [--bins 32] [--modes forward backward] [--repeats 9] [--budget-s S]
        [--out DIR] [--name nmi]

Times `masked_nmi` of one pair of (B, S, S, C) feature maps with half the pixels counted, as
the training loss calls it once per stage and pair of inputs (MFF's released training: B = 4,
S = 128, C = 30, two stages, one pair). Reports the median of `--repeats` calls after one
warm-up, the formulations of one configuration called in turn (`common.timeit_interleaved`),
XLA's temporary buffer size, then, per configuration, how much slower the formulation the loss
runs on this platform (`default_joint_counts`) is than the best other one. Forward + backward
is the same written-out backward pass for every formulation. After `--budget-s` seconds the
remaining configurations are "skipped (time budget)" (sizes are the outer loop).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

from mgdn_jax.losses import JOINT_COUNTS, default_joint_counts, masked_nmi

MODES = ("forward", "backward")
COLUMNS = [
    common.Column("mode", "pass"),
    common.Column("width", "C"),
    common.Column("size", "size"),
    common.Column("label", "joint counts"),
    common.Column("median_ms", "ms (median)", "{:.2f}"),
    common.Column("temp_mb", "XLA temp MB", "{:.0f}"),
    common.Column("compile_s", "compile s", "{:.1f}"),
    common.Column("status", "status"),
]


def program(counts: str, mode: str, bins: int) -> Any:
    """The jitted pass to time: forward (f1, f2, weight) -> (B,) NMI, or backward -> (NMI,
    d f1, d f2) of the batch mean."""

    def nmi(f1: jax.Array, f2: jax.Array, weight: jax.Array) -> jax.Array:
        return masked_nmi(f1, f2, weight, bins, 0.25 / bins, counts)

    if mode == "forward":
        return jax.jit(nmi)
    return jax.jit(jax.value_and_grad(lambda *a: jnp.mean(nmi(*a)), argnums=(0, 1)))


def inputs(batch: int, size: int, width: int) -> list[jax.Array]:
    """f1 = N(0, 1) and f2 = 0.6 f1 + N(0, 1) (B, S, S, C); weight (B, S, S), half ones."""
    rng = np.random.default_rng(0)
    f1, noise = (rng.standard_normal((batch, size, size, width), np.float32) for _ in "ab")
    weight = (rng.random((batch, size, size)) < 0.5).astype(np.float32)
    return [jnp.asarray(a) for a in (f1, 0.6 * f1 + noise, weight)]


def markdown(payload: dict[str, Any]) -> str:
    """The results tables as Markdown."""
    settings = payload["settings"]
    return "\n\n".join(
        [
            "### Masked NMI loss",
            common.machine_line(payload["machine"])
            + f" `masked_nmi` of one pair of (B, S, S, C) maps, B = {settings['batch']},"
            f" {settings['bins']} bins, half the pixels counted, float32, median of"
            f" {settings['repeats']} calls after one warm-up, the formulations of a"
            " configuration called in turn. Backward: forward + backward (the NMI and both"
            " maps' gradients). XLA temp MB: the compiled program's temporary buffers.",
            common.markdown_table(payload["rows"], COLUMNS),
            f"The default on {payload['machine']['backend']} (`default_joint_counts`) against"
            f" the fastest other formulation ({common.verdict(payload['summary'])}):",
            common.markdown_table(payload["summary"], common.SUMMARY_COLUMNS),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", nargs="+", choices=list(JOINT_COUNTS))
    parser.add_argument("--widths", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget-s", type=float, help="wall-clock limit of the whole run")
    parser.add_argument("--out", type=Path, help="write NAME.json and NAME.md here")
    parser.add_argument("--name", default="nmi", help="file name of the results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints and (with --out) writes the tables; returns the payload."""
    opts = parse_args(argv)
    names = opts.counts or list(JOINT_COUNTS)
    default = default_joint_counts(jax.export.default_export_platform())
    budget = common.Budget(opts.budget_s)
    payload: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "name")},
        "rows": [],
        "summary": [],
    }
    print(common.markdown_table([], COLUMNS), flush=True)
    for size, width, mode in itertools.product(sorted(opts.sizes), opts.widths, opts.modes):
        args = inputs(opts.batch, size, width)
        group, programs = [], {}
        for name in names:
            row = {"mode": mode, "width": width, "size": size, "formulation": name}
            row["default"] = name == default
            if budget.spent():
                row["status"] = "skipped (time budget)"
            else:
                compiled, compile_s = common.compile_timed(program(name, mode, opts.bins), *args)
                programs[name] = lambda compiled=compiled: compiled(*args)
                row.update(compile_s=compile_s, **common.compiled_memory(compiled))
            group.append(row)
        timings = common.timeit_interleaved(programs, opts.repeats)
        common.report_formulations(group, timings, MODES, payload, COLUMNS, opts, markdown)
    common.report_final(opts.out, opts.name, payload, markdown)
    return payload


if __name__ == "__main__":
    common.setup()
    main()
