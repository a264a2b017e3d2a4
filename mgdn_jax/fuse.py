"""`mgdn-fuse`: fuse images with a converted or official MGDN checkpoint.

    mgdn-fuse --variant mff --weights mff_62000_E.pth --output fused.png A.jpg B.jpg
    mgdn-fuse --variant mef --weights DIR --input-dir under/ over/ --output-dir out/
    mgdn-fuse --variant hdr --weights W --exposures 0 2 4 --output out.hdr l1.tif l2.tif l3.tif
    mgdn-fuse --variant gdsr --weights W --scale 4 --output depth.npy rgb.jpg lr_depth.npy
    mgdn-fuse --variant mff --weights W --tile 512 --tile-overlap 64 --output out.png A.jpg B.jpg
    mgdn-fuse --variant mff --weights W --dtype bfloat16 --output out.png A.jpg B.jpg

The output suffix picks the format: .png/.jpg uint8 with the official quantisation (clip, x255,
round), .npy float32 before quantisation, .tif 16-bit, .hdr Radiance (HDR). GDSR writes only
.npy, the depth in the units of the input, and a coloured preview beside it
(`NAME.preview.png`).
`--tile` fuses large images in overlapping tiles (an approximation, see the README);
`--dtype bfloat16` computes in bfloat16 with float32 parameters.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mgdn_jax import image_io, runtime
from mgdn_jax.errors import UserError, run_cli
from mgdn_jax.inference import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    DTYPES,
    check_tiling,
    jit_forward,
    run,
)
from mgdn_jax.variants import VARIANTS, gdsr_normalised_depth, gdsr_rgb, model_config

HDR_GAMMA = 2.2
INPUT_COUNT = {"mff": 2, "mef": 2, "hdr": 3, "gdsr": 2, "gdsr16": 2}
# --scale when not given: the upsampling factor each GDSR variant is released for.
DEFAULT_SCALE = {"gdsr": 4, "gdsr16": 16}


def _same_size(paths: list[Path], arrays: list[np.ndarray]) -> None:
    h, w = arrays[0].shape[:2]
    for p, a in zip(paths[1:], arrays[1:]):
        if a.shape[:2] != (h, w):
            raise UserError(
                f"{p}: size {a.shape[1]}x{a.shape[0]} differs from {paths[0]} ({w}x{h})"
            )


def hdr_inputs(ldrs: list[np.ndarray], times: np.ndarray) -> list[np.ndarray]:
    """LDR frames (H, W, 3) and exposure times -> network inputs (H, W, 6): LDR || LDR^2.2 / t."""
    return [np.concatenate([x, x**HDR_GAMMA / t], axis=-1) for x, t in zip(ldrs, times)]


def prepare(variant: str, paths: list[Path], args: argparse.Namespace) -> tuple[list, dict]:
    """Reads one example's files -> (network inputs (H, W, C_i), extras for `finish`)."""
    if variant.startswith("gdsr"):
        from mgdn_jax.resize import bicubic_resize

        rgb = image_io.read_image(paths[0])
        lr = image_io.read_depth(paths[1])
        h, w = rgb.shape[:2]
        scale = DEFAULT_SCALE[variant] if args.scale is None else args.scale
        if (lr.shape[0] * scale, lr.shape[1] * scale) != (h, w):
            raise UserError(
                f"{paths[1]}: depth of shape {lr.shape} times scale {scale} does not match "
                f"the {h}x{w} RGB image {paths[0]}"
            )
        normalised, lo, hi = gdsr_normalised_depth(lr)
        up = bicubic_resize(normalised, (h, w))[..., None]
        return [gdsr_rgb(rgb), up.astype(np.float32)], {"depth_range": (lo, hi)}
    images = [image_io.read_image(p) for p in paths]
    _same_size(paths, images)
    if variant == "hdr":
        if args.exposures is None:
            raise UserError("HDR needs --exposures EV EV EV or --exposure-file exposure.txt")
        return hdr_inputs(images, args.exposures), {}
    return images, {}


def finish(variant: str, output: np.ndarray, extras: dict, path: Path) -> None:
    """Writes one result (and the GDSR preview)."""
    if variant.startswith("gdsr"):
        lo, hi = extras["depth_range"]
        depth = np.clip(output[..., 0], 0.0, 1.0) * (hi - lo) + lo
        image_io.write_output(path, depth)
        image_io.write_output(path.with_suffix(".preview.png"), image_io.depth_preview(depth))
    else:
        image_io.write_output(path, output)


def _pairs(dirs: list[Path]) -> list[list[Path]]:
    """Pairs the image files of several directories by sorted order."""
    listings = []
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d}: no such directory")
        files = sorted(
            p for p in d.iterdir() if p.suffix.lower() in image_io.IMAGE_SUFFIXES + (".npy",)
        )
        if not files:
            raise UserError(f"{d}: no input files")
        listings.append(files)
    counts = {len(f) for f in listings}
    if len(counts) != 1:
        raise UserError(
            "input directories hold different numbers of files: "
            + ", ".join(f"{d} ({len(f)})" for d, f in zip(dirs, listings))
        )
    return [list(group) for group in zip(*listings)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgdn-fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", type=Path, help="input files of one example, in order")
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--weights", required=True, type=Path, help=".pth or converted directory")
    p.add_argument("--output", type=Path, help="output file (suffix picks the format)")
    p.add_argument("--input-dir", nargs="+", type=Path, help="one directory per input")
    p.add_argument("--output-dir", type=Path, help="with --input-dir")
    p.add_argument(
        "--format", help="output suffix in directory mode (default .png; GDSR .npy, the only one)"
    )
    p.add_argument("--pad", choices=("official", "model"), default="official")
    p.add_argument("--scale", type=int, help="GDSR upsampling factor (default: gdsr 4, gdsr16 16)")
    p.add_argument("--exposures", type=float, nargs="+", help="HDR: EV stops of the frames")
    p.add_argument("--exposure-file", type=Path, help="HDR: Kalantari exposure.txt")
    p.add_argument(
        "--tile",
        type=int,
        metavar="SIZE",
        help=f"fuse in SIZE x SIZE tiles, e.g. {DEFAULT_TILE} (a multiple of 8 and of the model "
        "window); images no larger than a tile run whole",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        metavar="N",
        help=f"least overlap of neighbouring tiles in pixels (default {DEFAULT_OVERLAP}, or a "
        "quarter of a smaller tile)",
    )
    p.add_argument(
        "--tile-batch", type=int, default=1, metavar="B", help="with --tile: tiles per pass"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype (parameters are stored, and outputs returned, in float32)",
    )
    return p


def _check_tiling(args: argparse.Namespace) -> None:
    """Validates the tiling options, before any work."""
    if args.tile is not None:
        window = model_config(args.variant).window_size
        check_tiling(args.tile, args.tile_overlap, window, args.tile_batch)
    elif args.tile_overlap is not None:
        raise UserError("--tile-overlap needs --tile")


def _check_options(args: argparse.Namespace) -> None:
    """Options that do not apply to the variant or the mode are errors, not ignored."""
    if args.scale is not None and not args.variant.startswith("gdsr"):
        raise UserError(f"--scale applies to GDSR only, not to {args.variant!r}")
    if args.scale is not None and args.scale < 1:
        raise UserError(f"--scale must be a positive integer, got {args.scale}")
    exposures = {"--exposures": args.exposures, "--exposure-file": args.exposure_file}
    given = [flag for flag, value in exposures.items() if value is not None]
    if given and args.variant != "hdr":
        raise UserError(f"{given[0]} applies to HDR only, not to {args.variant!r}")
    if len(given) == 2:
        raise UserError("give --exposures or --exposure-file, not both")
    if not args.input_dir and args.format is not None:
        raise UserError("--format applies with --input-dir only; --output's suffix picks it")
    if not args.input_dir and args.output_dir is not None:
        raise UserError("--output-dir needs --input-dir")


def _check_output_dir(directory: Path) -> None:
    """--output-dir: an existing directory, or one that can be made (it is made only when the
    first output is written, so that a run stopped by bad input leaves nothing behind)."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise UserError(f"{directory}: not writable")


def _jobs(args: argparse.Namespace) -> list[tuple[list[Path], Path]]:
    if args.input_dir:
        if args.inputs or args.output:
            raise UserError("use either INPUT... --output or --input-dir ... --output-dir")
        if args.output_dir is None:
            raise UserError("--input-dir needs --output-dir")
        suffix = args.format or (".npy" if args.variant.startswith("gdsr") else ".png")
        if not suffix.startswith("."):
            suffix = "." + suffix
        if suffix.lower() not in image_io.OUTPUT_SUFFIXES:
            known = ", ".join(image_io.OUTPUT_SUFFIXES)
            raise UserError(f"--format {args.format}: unknown output format; use one of {known}")
        _check_output_dir(args.output_dir)
        return [
            (group, args.output_dir / (group[0].stem + suffix)) for group in _pairs(args.input_dir)
        ]
    if args.output is None or not args.inputs:
        raise UserError("give the input files and --output (or --input-dir/--output-dir)")
    return [(args.inputs, args.output)]


def fuse_files(args: argparse.Namespace, progress: Callable = lambda x, **_: x) -> None:
    _check_options(args)
    _check_tiling(args)
    jobs = _jobs(args)
    for paths, out in jobs:
        if out.parent.is_dir():  # else an --output-dir checked and not made yet
            image_io.check_writable(out)
        if args.variant.startswith("gdsr") and out.suffix.lower() != ".npy":
            raise UserError(
                f"{out}: GDSR writes depth as .npy (float32, in the input's units); an image "
                "format would clip it to [0, 1]"
            )
        for p in paths:
            if not p.is_file():
                raise UserError(f"{p}: no such file")
    expected = INPUT_COUNT[args.variant]
    for paths, _ in jobs:
        if len(paths) != expected:
            raise UserError(f"variant {args.variant!r} takes {expected} inputs, got {len(paths)}")
    if args.exposure_file is not None:
        args.exposures = image_io.read_exposures(args.exposure_file, expected)
    elif args.exposures is not None:
        if len(args.exposures) != expected:
            raise UserError(f"--exposures needs {expected} values, got {len(args.exposures)}")
        args.exposures = image_io.exposure_times(args.exposures, "--exposures")

    from mgdn_jax.convert import load_weights

    model = load_weights(args.weights, args.variant)
    forward = jit_forward(model, args.dtype)
    task = model_config(args.variant).task
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    for paths, out in progress(jobs, desc="fusing", unit="image", disable=len(jobs) == 1):
        inputs, extras = prepare(args.variant, paths, args)
        output = run(
            forward,
            inputs,
            model.window_size,
            args.pad,
            task,
            tile=args.tile,
            overlap=args.tile_overlap,
            tile_batch=args.tile_batch,
        )
        if not np.all(np.isfinite(output)):
            raise UserError(
                f"{', '.join(map(str, paths))}: the output is not finite (NaN or infinity in "
                f"these inputs or in the weights {args.weights}); nothing written to {out}"
            )
        finish(args.variant, output, extras, out)


def main(argv: list[str] | None = None) -> int:
    """`mgdn-fuse`; `argv` without the program name (default: the command line, and then the
    program re-executes itself with huge pages and one malloc arena first,
    `runtime.use_huge_pages`)."""
    if argv is None:
        runtime.use_huge_pages(single_arena=True)
    args = _parser().parse_args(argv)
    runtime.configure()
    from tqdm import tqdm

    return run_cli(lambda: fuse_files(args, tqdm))


if __name__ == "__main__":
    sys.exit(main())
