"""Per-module comparison of our model against activations recorded from the official one.

    mgdn-parity --variant mff --weights mff_62000_E.pth activations.npz

The activation file holds `input0..`, `output` and `act/<official module name>` arrays (NHWC
images; token tensors in the official layout; `name[i]` for the i-th element of a list output,
`name#k` for the k-th call of a module), as written by `mgdn_jax.torch_hooks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgdn_jax import runtime
from mgdn_jax.convert import load_weights, module_path
from mgdn_jax.errors import UserError, run_cli
from mgdn_jax.layers import untied
from mgdn_jax.model import MGDN
from mgdn_jax.variants import VARIANTS

_ACT = re.compile(r"^act/(?P<module>[^#\[]+)(?:#(?P<call>\d+))?(?:\[(?P<item>\d+)\])?$")


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared array: the recorded `shape` and `ours_shape` (None for a module we cannot
    map); `max_abs`/`mean_abs` are None unless both exist with the same shape."""

    name: str
    shape: tuple[int, ...]
    max_abs: float | None
    mean_abs: float | None
    ref_max: float
    ours_shape: tuple[int, ...] | None

    def within(self, tolerance: float) -> bool:
        """max |ours - ref| <= tolerance * max(1, max |ref|) (False for another shape)."""
        return self.max_abs is not None and self.max_abs <= tolerance * max(1.0, self.ref_max)


def _as_ref_layout(ours: jax.Array, ref: np.ndarray) -> np.ndarray:
    ours = np.asarray(ours)
    if ours.ndim == 4 and ref.ndim == 3:  # image (B, H, W, C) vs tokens (B, H*W, C)
        ours = ours.reshape(ours.shape[0], -1, ours.shape[-1])
    return ours


def _row(name: str, ours: np.ndarray | None, ref: np.ndarray) -> Row:
    ref_max = float(np.max(np.abs(ref))) if ref.size else 0.0
    ours_shape = None if ours is None else tuple(ours.shape)
    if ours_shape != ref.shape:
        return Row(name, tuple(ref.shape), None, None, ref_max, ours_shape)
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return Row(name, ref.shape, float(diff.max()), float(diff.mean()), ref_max, ours_shape)


def compare(model: MGDN, activations: dict[str, np.ndarray]) -> list[Row]:
    """Runs `model` on the recorded inputs and compares every recorded array."""
    for i, channels in enumerate(model.in_channels):
        x = activations.get(f"input{i}")
        if x is None or x.ndim != 4 or x.shape[-1] != channels:
            got = "none" if x is None else f"shape {x.shape}"
            shape = f"(B, H, W, {channels})"
            raise UserError(
                f"the activations' input{i} should be {shape} for this model, got {got}"
            )
    inputs = [jnp.asarray(activations[f"input{i}"]) for i in range(model.num_inputs)]
    with untied():
        output, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            *inputs
        )
    flat = {
        ".".join(str(p) for p in path[:-1]): var.get_value()
        for path, var in nnx.to_flat_state(captured)
        if path[-1] == "__call__"
    }
    rows = [_row("output", np.asarray(output), activations["output"])]
    for key in sorted(k for k in activations if k.startswith("act/")):
        m = _ACT.match(key)
        calls = flat.get(module_path(m["module"])) if m else None
        call = int(m["call"] or 0) if m else 0
        ours = None
        if calls is not None and call < len(calls):
            ours = calls[call]
            if m["item"] is not None:
                ours = ours[int(m["item"])]
            ours = _as_ref_layout(ours, activations[key])
        rows.append(_row(key.removeprefix("act/"), ours, activations[key]))
    return rows


def format_table(rows: list[Row], tolerance: float) -> str:
    lines = ["| module | shape | max abs diff | mean abs diff | ok |", "|---|---|---|---|---|"]
    for r in rows:
        if r.ours_shape is None:
            lines.append(f"| {r.name} | {r.shape} | - | - | not mapped |")
        elif r.max_abs is None:
            lines.append(f"| {r.name} | {r.shape} | - | - | NO: ours is {r.ours_shape} |")
        else:
            ok = "yes" if r.within(tolerance) else "NO"
            lines.append(f"| {r.name} | {r.shape} | {r.max_abs:.3e} | {r.mean_abs:.3e} | {ok} |")
    return "\n".join(lines)


def read_activations(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        data = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz activation file") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: a single array, not an .npz activation file")
    with data:
        acts = {k: data[k] for k in data.files}
    if "output" not in acts or "input0" not in acts:
        raise UserError(f"{path}: no 'input0'/'output' arrays; not an activation file")
    return acts


def _tolerance(text: str) -> float:
    """--tolerance: a finite number >= 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mgdn-parity",
        description="Compare every recorded official module output with ours.",
    )
    parser.add_argument("activations", help=".npz written by mgdn_jax.torch_hooks")
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--weights", required=True, help=".pth or converted directory")
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=1e-4,
        help="max abs diff allowed, relative to max(1, max |ref|)",
    )
    args = parser.parse_args(argv)
    runtime.configure()
    jax.config.update("jax_default_matmul_precision", "highest")
    failed = []

    def run() -> None:
        acts = read_activations(args.activations)
        rows = compare(load_weights(args.weights, args.variant), acts)
        print(format_table(rows, args.tolerance))
        failed.extend(
            r.name for r in rows if r.ours_shape is not None and not r.within(args.tolerance)
        )
        if all(r.ours_shape is None for r in rows[1:]) and len(rows) > 1:
            failed.append("no recorded module could be mapped")

    status = run_cli(run)
    if status == 0 and failed:
        print(
            f"FAILED: {len(failed)} beyond tolerance {args.tolerance} or of another shape: "
            f"{failed[0]}",
            file=sys.stderr,
        )
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
