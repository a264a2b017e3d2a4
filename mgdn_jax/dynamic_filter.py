"""The per-pixel dynamic filter of MGDF and the network that predicts its taps.

Every output pixel is a 7x7 weighted sum of its replicate-padded neighbourhood, with 49 taps
predicted per pixel and shared by all channels:

        y[b, i, j, c] = sum_{dy, dx in 0..6} xpad[b, i + dy, j + dx, c] * K[b, i, j, 7 * dy + dx]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mgdn_jax.layers import ConvAct, conv, lrelu

KERNEL_SIZE = 7
NUM_TAPS = KERNEL_SIZE * KERNEL_SIZE


def _pad_replicate(x: jax.Array, k: int) -> jax.Array:
    """Replicate-pads (H, W, C) by k // 2 on every side."""
    r = k // 2
    return jnp.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")


def _check(x: jax.Array, taps: jax.Array, k: int) -> None:
    if x.ndim != 4 or taps.ndim != 4 or x.shape[:3] != taps.shape[:3] or taps.shape[-1] != k * k:
        raise ValueError(
            f"dynamic filter needs x (B, H, W, C) and taps (B, H, W, {k * k}) of the same B, H, W; "
            f"got {x.shape} and {taps.shape}"
        )


def _filter_image_shifted(x: jax.Array, taps: jax.Array, k: int) -> jax.Array:
    """One image, (H, W, C) x (H, W, k*k) -> (H, W, C), as k*k fused shifted multiply-adds."""
    h, w, _ = x.shape
    xpad = _pad_replicate(x, k)
    out = jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))
    for dy in range(k):
        for dx in range(k):
            t = k * dy + dx
            out = out + xpad[dy : dy + h, dx : dx + w, :] * taps[:, :, t : t + 1]
    return out.astype(x.dtype)


def _filter_image_unfold(x: jax.Array, taps: jax.Array, k: int) -> jax.Array:
    """One image, by materialising the (H, W, C, k*k) unfolded neighbourhoods."""
    h, w, _ = x.shape
    xpad = _pad_replicate(x, k)
    patches = jnp.stack(
        [xpad[dy : dy + h, dx : dx + w, :] for dy in range(k) for dx in range(k)], axis=-1
    )
    return jnp.einsum("hwct,hwt->hwc", patches, taps, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter(x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE) -> jax.Array:
    """Per-pixel dynamic filter, the default path (no unfolded tensor is materialised).

    Args:
        x: (B, H, W, C) features.
        taps: (B, H, W, kernel_size**2) per-pixel taps, row-major over the window.
        kernel_size: odd window size; the input is replicate-padded by kernel_size // 2.

    Returns:
        (B, H, W, C) filtered features.
    """
    _check(x, taps, kernel_size)
    return jax.vmap(functools.partial(_filter_image_shifted, k=kernel_size))(x, taps)


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter_unfold(
    x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE
) -> jax.Array:
    """Reference unfold formulation of `dynamic_filter` (materialises (B, H, W, C, k*k))."""
    _check(x, taps, kernel_size)
    return jax.vmap(functools.partial(_filter_image_unfold, k=kernel_size))(x, taps)


class KernelPredictor(nnx.Module):
    """conv3x3 -> LReLU(0.1) -> conv3x3 -> LReLU(0.1) -> conv1x1: (B, H, W, C) -> (B, H, W, 49)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, num_taps: int = NUM_TAPS):
        self.conv1 = ConvAct(channels, channels, 3, lrelu(0.1), rngs=rngs)
        self.conv2 = ConvAct(channels, channels, 3, lrelu(0.1), rngs=rngs)
        self.to_taps = conv(channels, num_taps, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.to_taps(self.conv2(self.conv1(x)))
