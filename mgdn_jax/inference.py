"""Inference helpers: the official scripts' inference procedures, a jit-compiled forward pass
(float32 or bfloat16), and tiled inference for images too large to run whole.

Flax and the model are imported where they are used, so that the command-line tools parse their
arguments (and validate tiling options) without loading them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from mgdn_jax import runtime
from mgdn_jax.errors import UserError

if TYPE_CHECKING:
    from mgdn_jax.model import MGDN

PAD_MODES = ("official", "model")
DTYPES = ("float32", "bfloat16")
OFFICIAL_MULTIPLE = 8
OFFICIAL_HDR_BLOCK = 500
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


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


def jit_forward(model: MGDN, dtype: str = "float32") -> Callable[..., jax.Array]:
    """A jit-compiled `model(*inputs)` -> float32; it compiles once per input shape.

    dtype='bfloat16' keeps the float32 parameters outside and casts them and the inputs to
    bfloat16 inside the compiled function, so the forward pass computes in bfloat16 (with the
    reductions the model and JAX keep in float32); the output is cast back to float32.
    """
    from flax import nnx

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    compute = jnp.dtype(dtype)
    graphdef, state = nnx.split(model)

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x

    @jax.jit
    def forward(state: nnx.State, *inputs: jax.Array) -> jax.Array:
        out = nnx.merge(graphdef, jax.tree.map(cast, state))(*(cast(x) for x in inputs))
        return out.astype(jnp.float32)

    compiled: dict[tuple, Callable[..., jax.Array]] = {}

    def call(*inputs: jax.Array) -> jax.Array:
        key = tuple((x.shape, jnp.result_type(x)) for x in inputs)
        if key not in compiled:  # compile, then return the compiler's freed memory to the OS
            compiled[key] = forward.lower(state, *inputs).compile()
            runtime.release_memory()
        return compiled[key](state, *inputs)

    return call


def tile_multiple(window: int) -> int:
    """Tile sides must be multiples of this: of the model window and of the official 8."""
    return math.lcm(window, OFFICIAL_MULTIPLE)


def default_overlap(tile: int, window: int) -> int:
    """DEFAULT_OVERLAP, or a quarter of a tile too small for it (at most tile - window)."""
    return min(DEFAULT_OVERLAP, tile // 4, tile - window)


def check_tiling(tile: int, overlap: int | None, window: int, batch: int = 1) -> int:
    """Returns the overlap (`default_overlap` for None); one-line `UserError` unless `tile` is a
    positive multiple of `tile_multiple(window)`, 0 <= overlap <= `tile` - `window` (so that
    consecutive tiles advance) and `batch` (tiles per forward pass) is positive."""
    if batch < 1:
        raise UserError(f"tile batch {batch} must be at least 1")
    multiple = tile_multiple(window)
    if tile <= 0 or tile % multiple:
        raise UserError(
            f"tile size {tile} is not a positive multiple of {multiple} "
            f"(the model window {window} and the padding multiple {OFFICIAL_MULTIPLE})"
        )
    if overlap is None:
        return default_overlap(tile, window)
    if not 0 <= overlap <= tile - window:
        raise UserError(f"tile overlap {overlap} must be between 0 and {tile - window}")
    return overlap


def tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of tiles of length `tile` that cover [0, size).

    The first tile starts at 0 and the last at size - tile (edge tiles are shifted inward, never
    shrunk); the others are spaced as evenly as multiples of `align` allow, consecutive tiles
    overlapping by at least `overlap`. `size` and `tile` must be multiples of `align`, and
    overlap <= tile - align. A side no longer than a tile gets the single start 0.
    """
    if size <= tile:
        return [0]
    units, step = (size - tile) // align, (tile - overlap) // align
    steps = -(-units // step)  # ceil: each step advances at most tile - overlap
    return [align * (i * units // steps) for i in range(steps + 1)]


def blend_weights(starts: list[int], tile: int) -> np.ndarray:
    """(n, tile) float32 blending weights of the tiles at `starts` along one axis: 1, except over
    the overlap with a neighbour, where a raised-cosine ramp rises from near 0 at the tile's edge
    (the neighbour's ramp falls, and the two sum to 1)."""
    weights = np.ones((len(starts), tile), np.float32)
    for i, start in enumerate(starts):
        if i > 0:
            ramp = _cosine_ramp(starts[i - 1] + tile - start)
            weights[i, : ramp.size] *= ramp
        if i < len(starts) - 1:
            ramp = _cosine_ramp(start + tile - starts[i + 1])
            weights[i, tile - ramp.size :] *= ramp[::-1]
    return weights


def _cosine_ramp(length: int) -> np.ndarray:
    """(length,) rising weights sin^2(pi/2 (k + 1/2) / length); ramp + ramp[::-1] = 1."""
    return np.sin(0.5 * np.pi * (np.arange(length) + 0.5) / length).astype(np.float32) ** 2


def _batches(
    tiles: list[tuple[int, int]], batch: int
) -> Iterator[tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
    """Yields (tiles, tiles padded to `batch` by repeating the last one), `batch` at a time."""
    for i in range(0, len(tiles), batch):
        chunk = tiles[i : i + batch]
        yield chunk, chunk + [chunk[-1]] * (batch - len(chunk))


def run_tiled(
    forward: Callable[..., jax.Array],
    inputs: list[np.ndarray],
    window: int,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    batch: int = 1,
) -> np.ndarray:
    """Fuses window-multiple (H, W, C_i) inputs tile by tile -> (H, W, C_out) float32.

    Every tile is min(tile, H) x min(tile, W) at window-aligned offsets (`tile_starts`), so one
    compilation serves them all; `batch` tiles go through the network at a time, and their
    outputs are blended into a host-side accumulator with `blend_weights`, normalised by the
    weight sum. MGCA and the channel attention use statistics of the whole (tile) image, so the
    result approximates the untiled output (see the README for the measured difference).
    """
    overlap = check_tiling(tile, overlap, window, batch)
    h, w = inputs[0].shape[:2]
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap, window), tile_starts(w, tw, overlap, window)
    wy, wx = blend_weights(ys, th), blend_weights(xs, tw)
    acc = weight_sum = None
    tiles = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    for chunk, padded in _batches(tiles, batch):
        stacked = [
            np.stack([x[ys[i] : ys[i] + th, xs[j] : xs[j] + tw] for i, j in padded]) for x in inputs
        ]
        out = np.asarray(forward(*(jnp.asarray(x) for x in stacked)))
        if acc is None:
            acc = np.zeros((h, w, out.shape[-1]), np.float32)
            weight_sum = np.zeros((h, w, 1), np.float32)
        for (i, j), tile_out in zip(chunk, out):
            weight = np.outer(wy[i], wx[j])[..., None]
            acc[ys[i] : ys[i] + th, xs[j] : xs[j] + tw] += tile_out * weight
            weight_sum[ys[i] : ys[i] + th, xs[j] : xs[j] + tw] += weight
    return acc / weight_sum


def run(
    forward: Callable[..., jax.Array],
    inputs: list[np.ndarray],
    window: int,
    pad: str = "official",
    task: str = "fusion",
    tile: int | None = None,
    overlap: int | None = None,
    tile_batch: int = 1,
) -> np.ndarray:
    """Runs one example: (H, W, C_i) float32 inputs -> (H, W, C_out) float32 output.

    pad='official' reproduces the release's inference script for `task`: "fusion" (MFF, MEF)
    flip-pads to the next multiple of 8 beyond the size; "hdr" runs the 500 x 500 blocks of the
    release's test loop one by one (edge blocks smaller), "gdsr" the whole image, both with the
    network's own reflect padding only. pad='model' runs the whole image with the network's
    reflect padding to its window multiple. With `tile`, a padded image (or HDR block) larger
    than `tile` on either side is fused by `run_tiled` in tiles overlapping by `overlap` pixels,
    `tile_batch` at a time; smaller ones run whole.
    """
    from mgdn_jax.model import check_reflect_pad

    if pad not in PAD_MODES:
        raise UserError(f"unknown padding {pad!r}; expected one of {', '.join(PAD_MODES)}")
    if tile is not None:
        check_tiling(tile, overlap, window, tile_batch)
    h, w = inputs[0].shape[:2]
    if pad == "official" and task == "hdr" and max(h, w) > OFFICIAL_HDR_BLOCK:
        n = OFFICIAL_HDR_BLOCK
        edge_h, edge_w = h - (h - 1) // n * n, w - (w - 1) // n * n
        try:
            check_reflect_pad(edge_h, edge_w, window)
        except UserError:
            raise UserError(
                f"the release's {n}x{n} HDR blocks leave a {edge_h}x{edge_w} edge block of this "
                f"{h}x{w} image, too small to reflect-pad to a multiple of {window} (the release "
                "fails on it too); use pad='model' (mgdn-fuse --pad model)"
            ) from None
        blocks = [
            (slice(i, i + n), slice(j, j + n)) for i in range(0, h, n) for j in range(0, w, n)
        ]
        outs = [
            run(
                forward,
                [x[rows, cols] for x in inputs],
                window,
                "model",
                task,
                tile,
                overlap,
                tile_batch,
            )
            for rows, cols in blocks
        ]
        out = np.empty((h, w, outs[0].shape[-1]), np.float32)
        for (rows, cols), block_out in zip(blocks, outs):
            out[rows, cols] = block_out
        return out
    batch = [x[None] for x in inputs]
    if pad == "official" and task == "fusion":
        size = official_padded_size(h, w)
        batch = [flip_pad(x, size) for x in batch]
    check_reflect_pad(*batch[0].shape[1:3], window)
    hp, wp = (-(-n // window) * window for n in batch[0].shape[1:3])
    if tile is None or (hp <= tile and wp <= tile):
        out = forward(*(jnp.asarray(x) for x in batch))
        return np.asarray(out[0, :h, :w])
    images = [x[0] for x in batch]
    if images[0].shape[:2] != (hp, wp):  # no flip padding: the network's reflect padding, here
        widths = ((0, hp - images[0].shape[0]), (0, wp - images[0].shape[1]), (0, 0))
        images = [np.pad(x, widths, mode="reflect") for x in images]
    return run_tiled(forward, images, window, tile, overlap, tile_batch)[:h, :w]
