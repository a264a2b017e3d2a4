"""Time and memory of one 520x520 MFF pair through the official-protocol inference path.

    python bench/fuse_520.py [--repeats 3] [--json out.json]

Prints a Markdown table: compile time, steady-state seconds per pair (the best of --repeats
pair-only runs), effective GFLOP/s from the release's counted 0.39 MFLOP per output pixel (at
the padded 528x528 size), the process's peak RSS (compilation included) and its peak RSS while
the compiled forward pass runs (after compilation, whose freed memory `jit_forward` returns to
the OS). Then --repeats rounds of one pair and one float32 matmul (`common.matmul_call`) in
turn: the machine's matmul peak (median over the rounds) and the pair's share of it, the median
of the rounds' ratios, so that a machine whose speed drifts affects both sides of a ratio
alike. Uses the official weights from ../shared (converted in a child process, so torch is not
loaded here) when present, else random ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import jax
import numpy as np

from mgdn_jax import runtime
from mgdn_jax.convert import load_converted
from mgdn_jax.inference import jit_forward, run
from mgdn_jax.model import build_model
from mgdn_jax.variants import model_config

SHARED = Path(os.environ.get("MGDN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runtime.use_huge_pages(single_arena=True)  # as mgdn-fuse does
    runtime.configure()
    weights = SHARED / "reference/weights/mff_62000_E.pth"
    if weights.is_file():  # converted in a child process, so torch never inflates our RSS
        converted = Path(tempfile.mkdtemp()) / "mff"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mgdn_jax.convert",
                str(weights),
                "--variant",
                "mff",
                "--output",
                str(converted),
            ],
            check=True,
        )
        model, _ = load_converted(converted)
    else:
        model = build_model(model_config("mff"))
    rng = np.random.default_rng(0)
    a, b = (rng.random((520, 520, 3), np.float32) for _ in range(2))
    forward = jit_forward(model)

    def pair() -> np.ndarray:
        return run(forward, [a, b], model.window_size)

    start = time.perf_counter()
    pair()
    first = time.perf_counter() - start
    common.reset_peak_rss()
    steady = common.timeit(pair, args.repeats, warmup=0).min
    memory = common.peak_memory()
    gflop = common.RELEASE_MFLOP_PER_PIXEL["mff"] * 528 * 528 / 1e3
    n = common.matmul_size()
    rounds = common.timeit_interleaved(
        {"pair": pair, "matmul": common.matmul_call("float32", n)}, args.repeats
    )
    matmul_gflops = [2 * n**3 / t / 1e9 for t in rounds["matmul"].times]
    shares = [100 * gflop / p / m for p, m in zip(rounds["pair"].times, matmul_gflops)]
    result = {
        "device": jax.devices()[0].device_kind,
        "cores": os.cpu_count(),
        "compile_s": first - steady,
        "seconds_per_pair": steady,
        "effective_gflops": gflop / steady,
        "matmul_peak_gflops": statistics.median(matmul_gflops),
        "peak_pct": statistics.median(shares),
        **memory,
    }
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print(
        "| "
        + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in result.values())
        + " |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
