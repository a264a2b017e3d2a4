"""Accuracy of tiled and of bfloat16 inference against untiled float32 on the Lytro pairs.

    python bench/tiling_accuracy.py [--tile 256] [--overlap 64] [--limit N] [--json out.json]

Fuses every pair of ../shared/reference/lytro (or --pairs DIR with A/ and B/) with the MFF
weights through the official inference protocol three times: untiled float32 (the reference),
tiled float32 (tiles of --tile, smaller than the 528x528 padded pairs, overlapping by at least
--overlap) and untiled bfloat16. Prints a Markdown table of the PSNR (dB, peak 1, unquantised
outputs) of each against the reference, min / mean over the pairs and seconds per pair
(indicative: compilation is excluded, but not other load on the machine), and writes the
per-pair values as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from mgdn_jax import image_io, runtime
from mgdn_jax.inference import DEFAULT_OVERLAP, jit_forward, run

SHARED = Path(os.environ.get("MGDN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of (H, W, C) images in [0, 1]."""
    return float(10 * np.log10(1.0 / np.mean(np.square(a - b))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=SHARED / "reference/lytro")
    parser.add_argument(
        "--weights", type=Path, default=SHARED / "reference/weights/mff_62000_E.pth"
    )
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    parser.add_argument("--limit", type=int, help="only the first N pairs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runtime.configure()
    from mgdn_jax.convert import load_weights

    model = load_weights(args.weights, "mff")
    window = model.window_size
    f32, bf16 = jit_forward(model), jit_forward(model, "bfloat16")
    methods = {
        "untiled": lambda x: run(f32, x, window),
        "tiled": lambda x: run(f32, x, window, tile=args.tile, overlap=args.overlap),
        "bfloat16": lambda x: run(bf16, x, window),
    }
    labels = {
        "untiled": "untiled float32 (reference)",
        "tiled": f"tiles of {args.tile}, overlap >= {args.overlap}, float32",
        "bfloat16": "untiled bfloat16",
    }
    names = sorted(p.stem for p in (args.pairs / "A").iterdir())[: args.limit]
    psnrs: dict[str, dict[str, float]] = {"tiled": {}, "bfloat16": {}}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for i, name in enumerate(names):
        pair = [image_io.read_image(next((args.pairs / side).glob(f"{name}.*"))) for side in "AB"]
        outputs = {}
        for method, fn in methods.items():
            start = time.perf_counter()
            outputs[method] = fn(pair)
            if i > 0:  # the first pair compiles
                seconds[method].append(time.perf_counter() - start)
        for method, values in psnrs.items():
            values[name] = psnr(outputs[method], outputs["untiled"])
        print(name, {m: round(v[name], 2) for m, v in psnrs.items()}, flush=True)
    summary = {
        "pairs": len(names),
        "tile": args.tile,
        "overlap": args.overlap,
        "psnr_db": {
            m: {"min": min(v.values()), "mean": float(np.mean(list(v.values()))), "per_pair": v}
            for m, v in psnrs.items()
        },
        "seconds_per_pair_median": {m: float(np.median(s)) for m, s in seconds.items() if s},
    }
    print(f"\n{len(names)} Lytro pairs, PSNR against untiled float32\n")
    print("| | min PSNR (dB) | mean PSNR (dB) | s / pair |")
    print("|---|---|---|---|")
    for method, label in labels.items():
        stats = summary["psnr_db"].get(method)
        cells = f"{stats['min']:.2f} | {stats['mean']:.2f}" if stats else "- | -"
        timing = summary["seconds_per_pair_median"].get(method)
        print(f"| {label} | {cells} | {f'{timing:.1f}' if timing else '-'} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
