"""The per-pixel dynamic filter: every formulation of `mgdn_jax.dynamic_filter.FORMULATIONS`,
forward and forward + backward, per width and image size.

    python bench/filter.py [--formulations shifted unfold ...] [--widths 30 60]
        [--sizes 128 256 512 1024] [--batch 1] [--modes forward backward] [--repeats 5]
        [--max-gb 4] [--max-seconds 10] [--budget-s S] [--out DIR] [--name filter]

Reports the median time of `--repeats` calls after one warm-up (fewer, but at least one, once
they add up to `--max-seconds`), the formulations of one configuration called in turn
(`common.timeit_interleaved`), effective GFLOP/s and XLA's temporary buffer size
(`compiled.memory_analysis()`), then, per configuration, how much slower the formulation the
model runs there (`default_formulation` of the platform and (B, S, S, C)) is than the best other
one. FLOPs are counted as 2 k^2 B H W C for the forward pass (one multiply and one add per tap,
channel and pixel) and three times that for forward + backward (which also yields d x and
d taps).

Skips: a configuration whose buffers exceed `--max-gb` is "skipped (memory)" (decided after
compilation, before running); a formulation other than the default predicted (linearly in
pixels from its largest measured size) to take more than `--max-seconds` per call is "skipped
(time)"; after `--budget-s` seconds the rest is "skipped (time budget)". Sizes are the outer
loop (smallest first), so a budget cuts the largest sizes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

from mgdn_jax.dynamic_filter import FORMULATIONS, KERNEL_SIZE, default_formulation

MODES = ("forward", "backward")
COLUMNS = [
    common.Column("mode", "pass"),
    common.Column("width", "C"),
    common.Column("size", "size"),
    common.Column("label", "formulation"),
    common.Column("median_ms", "ms (median)", "{:.2f}"),
    common.Column("gflops", "GFLOP/s", "{:.2f}"),
    common.Column("temp_mb", "XLA temp MB", "{:.0f}"),
    common.Column("compile_s", "compile s", "{:.1f}"),
    common.Column("status", "status"),
]


def filter_flops(batch: int, size: int, width: int, kernel_size: int, mode: str) -> float:
    """2 k^2 B H W C for the forward pass; three times that for forward + backward."""
    forward = 2 * kernel_size**2 * batch * size * size * width
    return forward if mode == "forward" else 3 * forward


def program(fn: Callable[..., jax.Array], mode: str, kernel_size: int) -> Callable[..., Any]:
    """The jitted pass to time: forward (x, taps) -> y, or backward (x, taps, dy) ->
    (y, dx, dtaps), which keeps the forward output alive so that it is not pruned."""
    if mode == "forward":
        return jax.jit(lambda x, taps: fn(x, taps, kernel_size=kernel_size))

    def forward_backward(x: jax.Array, taps: jax.Array, dy: jax.Array) -> tuple[jax.Array, ...]:
        y, vjp = jax.vjp(lambda a, b: fn(a, b, kernel_size=kernel_size), x, taps)
        return (y, *vjp(dy))

    return jax.jit(forward_backward)


def inputs(batch: int, size: int, width: int, kernel_size: int, mode: str) -> list[jax.Array]:
    """x (B, S, S, C), taps (B, S, S, k^2) and, for the backward pass, dy (B, S, S, C)."""
    rng = np.random.default_rng(0)
    shapes = [(batch, size, size, width), (batch, size, size, kernel_size**2)]
    if mode == "backward":
        shapes.append(shapes[0])
    return [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]


def compile_one(
    name: str, mode: str, args: list[jax.Array], kernel_size: int, opts: argparse.Namespace
) -> tuple[Any, dict[str, Any]]:
    """Compiles one formulation on `args`: (executable, {compile_s, temp_mb, ...}), or (None,
    {..., status}) when its buffers exceed `--max-gb`."""
    compiled, compile_s = common.compile_timed(
        program(FORMULATIONS[name], mode, kernel_size), *args
    )
    memory = common.compiled_memory(compiled)
    result: dict[str, Any] = {"compile_s": compile_s, **memory}
    if sum(memory.values()) > opts.max_gb * 1e3:
        return None, {**result, "status": "skipped (memory)"}
    return compiled, result


def predicted_seconds(rows: Sequence[dict[str, Any]], key: tuple, size: int) -> float:
    """Seconds per call at `size`^2 pixels, scaled linearly in pixels from the largest measured
    size of `key` (formulation, mode, width); 0 when none was measured."""
    measured = [r for r in rows if r.get("median_s") and _key(r) == key]
    if not measured:
        return 0.0
    last = max(measured, key=lambda r: r["size"])
    return last["median_s"] * (size / last["size"]) ** 2


def _key(row: dict[str, Any]) -> tuple:
    return row["formulation"], row["mode"], row["width"]


def markdown(payload: dict[str, Any]) -> str:
    """The results tables as Markdown."""
    settings = payload["settings"]
    return "\n\n".join(
        [
            "### Per-pixel dynamic filter",
            common.machine_line(payload["machine"])
            + f" Batch {settings['batch']}, {settings['kernel_size']}×{settings['kernel_size']}"
            f" taps, float32, median of {settings['repeats']} calls after one warm-up, the"
            " formulations of a configuration called in turn. FLOPs: 2·k²·B·H·W·C forward (one"
            " multiply-add per tap, channel and pixel), 3× that "
            "for forward + backward (y, dx and dtaps). XLA temp MB: the compiled program's "
            "temporary buffers (`memory_analysis()`).",
            common.markdown_table(payload["rows"], COLUMNS),
            f"The default on {payload['machine']['backend']} (`default_formulation`, by"
            " platform and size) against the fastest other formulation measured"
            f" ({common.verdict(payload['summary'])}):",
            common.markdown_table(payload["summary"], common.SUMMARY_COLUMNS),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formulations", nargs="+", choices=list(FORMULATIONS))
    parser.add_argument("--widths", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kernel-size", type=int, default=KERNEL_SIZE)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip larger programs")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="per call, see above")
    parser.add_argument("--budget-s", type=float, help="wall-clock limit of the whole run")
    parser.add_argument("--out", type=Path, help="write NAME.json and NAME.md here")
    parser.add_argument("--name", default="filter", help="file name of the results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints and (with --out) writes the tables; returns the payload."""
    opts = parse_args(argv)
    names = opts.formulations or list(FORMULATIONS)
    budget = common.Budget(opts.budget_s)
    payload: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "name")},
        "rows": [],
        "summary": [],
    }
    rows = payload["rows"]
    print("\n".join(common.markdown_table([], COLUMNS).splitlines()), flush=True)
    for size, width, mode in itertools.product(sorted(opts.sizes), opts.widths, opts.modes):
        args = inputs(opts.batch, size, width, opts.kernel_size, mode)
        default = default_formulation(jax.export.default_export_platform(), args[0].shape)
        group, programs = [], {}
        for name in names:
            row = {"mode": mode, "width": width, "size": size, "formulation": name}
            row["default"] = name == default
            if budget.spent():
                row["status"] = "skipped (time budget)"
            elif name != default and predicted_seconds(rows, _key(row), size) > opts.max_seconds:
                row["status"] = "skipped (time)"
            else:
                compiled, result = compile_one(name, mode, args, opts.kernel_size, opts)
                row.update(result)
                if compiled is not None:
                    programs[name] = functools.partial(compiled, *args)
            group.append(row)
        timings = common.timeit_interleaved(programs, opts.repeats, max_seconds=opts.max_seconds)
        flops = filter_flops(opts.batch, size, width, opts.kernel_size, mode)
        for row in group:
            if row["formulation"] in timings:
                row["gflops"] = flops / timings[row["formulation"]].median / 1e9
        common.report_formulations(group, timings, MODES, payload, COLUMNS, opts, markdown)
    common.report_final(opts.out, opts.name, payload, markdown)
    return payload


if __name__ == "__main__":
    common.setup()
    main()
