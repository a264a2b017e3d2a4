"""Whole-model inference of every released variant, per image size.

    python bench/model.py [--variants mff mef hdr gdsr gdsr16] [--sizes 256 520 1024]
        [--hdr-sizes 1000x1500] [--repeats 3] [--dtypes float32 bfloat16] [--in-process]
        [--budget-s S] [--out DIR] [--name model]

One image (batch 1) per call through a jitted forward pass of a randomly initialised model
(speed does not depend on the weights). Reports compile time (trace, lower, compile), the
median of `--repeats` calls after one warm-up, and effective GFLOP/s from two FLOP counts per
output pixel: the release's (PyTorch's FLOP counter: MFF 0.39, MEF 1.99, HDR 3.97, GDSR 0.63
MFLOP; none published for GDSR x16) and XLA's own count of the compiled program
(`cost_analysis()`, which also counts elementwise work, but on GPUs not the convolutions
that run as cuDNN custom calls) -- each also as a share of the
machine's matmul peak, measured in the same run in the same dtype at the default precision
(TF32 for float32 on recent NVIDIA GPUs), and off CPU XLA's count also as a share of the
full-float32 peak. Memory: XLA's temporary
buffers, and the peak RSS (and, on a GPU, the device's peak bytes in use) of a child process
that runs that configuration alone (with --in-process these peaks are cumulative over the run).
Sizes run in the order given, each for every variant and dtype, so with `--budget-s` the
first sizes are measured for every variant before the budget runs out.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgdn_jax.model import abstract_model
from mgdn_jax.variants import VARIANTS, model_config

SCRIPT = Path(__file__).resolve()
COLUMNS = [
    common.Column("variant", "variant"),
    common.Column("size_label", "size"),
    common.Column("dtype", "dtype"),
    common.Column("compile_s", "compile s", "{:.1f}"),
    common.Column("median_s", "s / image", "{:.3f}"),
    common.Column("release_mflop_px", "release MFLOP/px", "{:.2f}"),
    common.Column("xla_mflop_px", "XLA MFLOP/px", "{:.2f}"),
    common.Column("release_gflops", "GFLOP/s (release)", "{:.1f}"),
    common.Column("xla_gflops", "GFLOP/s (XLA)", "{:.1f}"),
    common.Column("release_peak_pct", "% peak (release)", "{:.1f}"),
    common.Column("xla_peak_pct", "% peak (XLA)", "{:.1f}"),
    common.Column("xla_fp32_peak_pct", "% fp32 peak (XLA)", "{:.1f}"),
    common.Column("temp_mb", "XLA temp MB", "{:.0f}"),
    common.Column("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    common.Column("run_peak_rss_mb", "run peak RSS MB", "{:.0f}"),
    common.Column("device_peak_mb", "device peak MB", "{:.0f}"),
    common.Column("status", "status"),
]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Compiles and times the forward pass of spec's variant on one (1, H, W, C_i) input set
    of its size and dtype."""
    variant, size, dtype = spec["variant"], spec["size"], spec["dtype"]
    cfg = model_config(variant)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    params = common.random_params(abstract, dtype)
    rng = np.random.default_rng(0)
    images = [
        jnp.asarray(rng.random((1, *size, c), np.float32), common.DTYPES[dtype])
        for c in cfg.in_channels
    ]
    forward = jax.jit(lambda params, *xs: nnx.merge(graphdef, params)(*xs))
    compiled, compile_s = common.compile_timed(forward, params, *images)
    timing = common.timeit(lambda: compiled(params, *images), spec["repeats"])
    return {
        "compile_s": compile_s,
        "median_s": timing.median,
        "times": list(timing.times),
        "xla_flops": common.compiled_flops(compiled),
        **common.compiled_memory(compiled),
        **common.peak_memory(),
        "status": "ok",
    }


def derived(row: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """FLOP counts per output pixel, effective GFLOP/s and shares of the matmul peaks."""
    pixels = row["size"][0] * row["size"][1]
    out = {
        "size_label": common.size_label(row["size"]),
        "release_mflop_px": common.RELEASE_MFLOP_PER_PIXEL.get(row["variant"]),
    }
    if row.get("xla_flops"):
        out["xla_mflop_px"] = row["xla_flops"] / pixels / 1e6
    for count in ("release", "xla"):
        per_pixel = out.get(f"{count}_mflop_px")
        if per_pixel and row.get("median_s"):
            gflops = per_pixel * pixels / 1e3 / row["median_s"]
            out[f"{count}_gflops"] = gflops
            shares = common.peak_shares(gflops, row["dtype"], peaks)
            out.update({f"{count}_{key}": value for key, value in shares.items()})
    out.pop("release_fp32_peak_pct", None)
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The results table as Markdown."""
    settings, peak = payload["settings"], payload["matmul"]
    isolation = (
        "cumulative over the whole run (--in-process)"
        if settings["in_process"]
        else "of a child process running that configuration alone"
    )
    return "\n\n".join(
        [
            "### Whole-model inference",
            common.machine_line(payload["machine"])
            + f" Batch 1, median of {settings['repeats']} calls after one warm-up; "
            + common.peaks_line(peak)
            + " (% peak: against the row's dtype at the default precision; % fp32 peak: "
            "against float32 at the highest precision). FLOPs per "
            "output pixel (H×W of the input): the release's PyTorch count (ARCHITECTURE.md; "
            "none for GDSR ×16) and XLA's count of the compiled program (`cost_analysis()`, "
            "elementwise work included). Peak RSS / device peak: "
            + isolation
            + "; peak RSS includes compilation, run peak RSS is the peak while the compiled "
            "program runs (after the compiler's freed memory is returned, as `mgdn-fuse` does).",
            common.markdown_table(payload["rows"], COLUMNS),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--sizes", nargs="*", default=["256", "520", "1024"], help="S or HxW")
    parser.add_argument("--hdr-sizes", nargs="*", default=["1000x1500"], help="HDR only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", choices=list(common.DTYPES), default=["float32"])
    common.add_benchmark_args(parser, "model")
    return parser.parse_args(argv)


def configurations(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """{variant, size (H, W), dtype, repeats} per configuration: sizes in the order given,
    every variant and dtype at each; then HDR's extra sizes."""
    sizes = [(common.parse_size(s), opts.variants) for s in opts.sizes]
    if "hdr" in opts.variants:
        sizes += [(common.parse_size(s), ["hdr"]) for s in opts.hdr_sizes]
    return [
        {"variant": v, "size": list(size), "dtype": d, "repeats": opts.repeats}
        for size, variants in sizes
        for v in variants
        for d in opts.dtypes
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints and (with --out) writes the table; returns the payload."""
    order = {v: i for i, v in enumerate(VARIANTS)}

    def sort_key(row: dict[str, Any]) -> tuple:
        return order[row["variant"]], row["size"][0] * row["size"][1], row["dtype"] != "float32"

    return common.run_benchmark(
        SCRIPT, parse_args(argv), measure, configurations, derived, COLUMNS, markdown, sort_key
    )


if __name__ == "__main__":
    common.setup()
    main()
