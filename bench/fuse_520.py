"""Time and memory of one 520x520 MFF pair through the official-protocol inference path.

    python bench/fuse_520.py [--repeats 3] [--json out.json]

Prints a Markdown table: compile time, steady-state seconds per pair, effective GFLOP/s from
the release's counted 0.39 MFLOP per output pixel (at the padded 528x528 size), and the
process's peak RSS (compilation included) and its peak RSS while the compiled forward pass
runs (after compilation, whose freed memory `jit_forward` returns to the OS). Uses the
official weights from ../shared (converted in a child process, so torch is not loaded here)
when present, else random ones.
"""

from __future__ import annotations

import argparse
import json
import os
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

MFLOP_PER_PIXEL = {"mff": 0.39}
SHARED = Path(os.environ.get("MGDN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runtime.use_huge_pages()  # as mgdn-fuse does
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
    start = time.perf_counter()
    run(forward, [a, b], model.window_size)
    first = time.perf_counter() - start
    common.reset_peak_rss()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(forward, [a, b], model.window_size)
        times.append(time.perf_counter() - start)
    steady = min(times)
    gflop = MFLOP_PER_PIXEL["mff"] * 528 * 528 / 1e3
    result = {
        "device": jax.devices()[0].device_kind,
        "cores": os.cpu_count(),
        "compile_s": first - steady,
        "seconds_per_pair": steady,
        "effective_gflops": gflop / steady,
        **common.peak_memory(),
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
