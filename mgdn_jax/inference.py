"""Inference helpers: the official script's outer padding and a jit-compiled forward pass."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgdn_jax.errors import UserError
from mgdn_jax.model import MGDN, check_reflect_pad

PAD_MODES = ("official", "model")
OFFICIAL_MULTIPLE = 8


def official_padded_size(h: int, w: int) -> tuple[int, int]:
    """The official inference script's size: (h // 8 + 1) * 8 by (w // 8 + 1) * 8 (a side that is
    already a multiple of 8 still grows by 8)."""
    return (h // OFFICIAL_MULTIPLE + 1) * OFFICIAL_MULTIPLE, (
        w // OFFICIAL_MULTIPLE + 1
    ) * OFFICIAL_MULTIPLE


def flip_pad(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pads (B, H, W, C) bottom/right as the official script does: append the vertically flipped
    image, crop to size[0] rows, append the horizontally flipped result, crop to size[1] columns.
    """
    _, h, w, _ = x.shape
    if size[0] > 2 * h or size[1] > 2 * w:
        raise UserError(f"image of {h}x{w} is too small to flip-pad to {size[0]}x{size[1]}")
    x = np.concatenate([x, x[:, ::-1]], axis=1)[:, : size[0]]
    return np.concatenate([x, x[:, :, ::-1]], axis=2)[:, :, : size[1]]


def jit_forward(model: MGDN) -> Callable[..., jax.Array]:
    """A jit-compiled `model(*inputs)`; it compiles once per input shape."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state: nnx.State, *inputs: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(*inputs)

    return lambda *inputs: forward(state, *inputs)


def run(
    forward: Callable[..., jax.Array], inputs: list[np.ndarray], window: int, pad: str = "official"
) -> np.ndarray:
    """Runs one example: (H, W, C_i) float32 inputs -> (H, W, C_out) float32 output.

    pad='official' reproduces the official inference script (flip padding to the next multiple
    of 8 beyond the size, then the network's own reflect padding); pad='model' uses only the
    network's reflect padding to its window multiple.
    """
    if pad not in PAD_MODES:
        raise UserError(f"unknown padding {pad!r}; expected one of {', '.join(PAD_MODES)}")
    h, w = inputs[0].shape[:2]
    batch = [x[None] for x in inputs]
    if pad == "official":
        size = official_padded_size(h, w)
        batch = [flip_pad(x, size) for x in batch]
    check_reflect_pad(*batch[0].shape[1:3], window)
    out = forward(*(jnp.asarray(x) for x in batch))
    return np.asarray(out[0, :h, :w])
