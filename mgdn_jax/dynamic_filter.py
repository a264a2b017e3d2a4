"""The per-pixel dynamic filter of MGDF and the network that predicts its taps.

Every output pixel is a 7x7 weighted sum of its replicate-padded neighbourhood, with 49 taps
predicted per pixel and shared by all channels:

        y[b, i, j, c] = sum_{dy, dx in 0..6} xpad[b, i + dy, j + dx, c] * K[b, i, j, 7 * dy + dx]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mgdn_jax.layers import ConvAct, add_each, conv, lrelu, recomputed

KERNEL_SIZE = 7
NUM_TAPS = KERNEL_SIZE * KERNEL_SIZE


def _pad_replicate(x: jax.Array, k: int) -> jax.Array:
    """Replicate-pads (B, H, W, C) by k // 2 on every spatial side."""
    r = k // 2
    return jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")


def _check(x: jax.Array, taps: jax.Array, k: int) -> None:
    if x.ndim != 4 or taps.ndim != 4 or x.shape[:3] != taps.shape[:3] or taps.shape[-1] != k * k:
        raise ValueError(
            f"dynamic filter needs x (B, H, W, C) and taps (B, H, W, {k * k}) of the same B, H, W; "
            f"got {x.shape} and {taps.shape}"
        )


def _merge_minor(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W * C), a free reshape: a shift by d pixels along the width is
    a shift by d * C along the merged axis."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w * c)


def _spread(taps: jax.Array, t: int, c: int) -> jax.Array:
    """Tap t of (B, H, W, k*k) taps repeated for C channels, in the merged layout (B, H, W * C)."""
    b, h, w, _ = taps.shape
    return _merge_minor(jnp.broadcast_to(taps[..., t : t + 1], (b, h, w, c)))


def _filter_padded(xpad: jax.Array, taps: jax.Array, k: int) -> jax.Array:
    """(B, H + k - 1, W + k - 1, C) padded features x (B, H, W, k*k) taps -> (B, H, W, C), as
    k*k fused shifted multiply-adds.

    Width and channels are one merged minor axis (`_merge_minor`), so that the multiply-adds
    vectorise along W * C rather than along the few channels (2-3x faster on CPU, with no
    transposes); a tap is repeated across the channels of its pixel (`_spread`).
    """
    b, h, w, _ = taps.shape
    c = xpad.shape[-1]
    flat = _merge_minor(xpad)
    out = jnp.zeros((b, h, w * c), jnp.promote_types(xpad.dtype, jnp.float32))
    for dy in range(k):
        for dx in range(k):
            t = k * dy + dx
            out = out + flat[:, dy : dy + h, dx * c : (dx + w) * c] * _spread(taps, t, c)
    return out.reshape(b, h, w, c).astype(xpad.dtype)


def _filter_cf_padded(xpad: jax.Array, taps: jax.Array, k: int) -> jax.Array:
    """`_filter_padded` computed channels-first: the (B, H + k - 1, W + k - 1, C) padded
    features and (B, H, W, k*k) taps are transposed to (B, C, ...) and (B, k*k, H, W), so
    that the k*k shifted multiply-adds vectorise along the image width rather than the few
    channels; the (B, H, W, C) result is transposed back."""
    _, h, w, _ = taps.shape
    xpad_cf = jnp.transpose(xpad, (0, 3, 1, 2))
    taps_cf = jnp.transpose(taps, (0, 3, 1, 2))
    out = jnp.zeros((*xpad_cf.shape[:2], h, w), jnp.promote_types(xpad.dtype, jnp.float32))
    for dy in range(k):
        for dx in range(k):
            t = k * dy + dx
            out = out + xpad_cf[:, :, dy : dy + h, dx : dx + w] * taps_cf[:, t : t + 1]
    return jnp.transpose(out, (0, 2, 3, 1)).astype(xpad.dtype)


def _tap_gradients(xpad: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """d taps: (B, H + k - 1, W + k - 1, C) padded input, (B, H, W, C) output cotangent ->
    (B, H, W, k*k), d taps[..., t] = sum_c (xpad shifted by t) * g.

    The k products of one kernel row are summed over the channels by one variadic reduction
    (k sums in one pass over the maps), which XLA:CPU fuses into a single loop. Each sum on
    its own goes to YNNPACK's reduction, 2.4x slower at C = 30 and 3.3x at C = 60 (4 x 128^2).
    """
    _, h, w, _ = g.shape
    acc = jnp.promote_types(xpad.dtype, jnp.float32)
    xpad, g = xpad.astype(acc), g.astype(acc)
    zeros = (jnp.zeros((), acc),) * k
    sums: list[jax.Array] = []
    for dy in range(k):
        products = tuple(xpad[:, dy : dy + h, dx : dx + w] * g for dx in range(k))
        sums += jax.lax.reduce(products, zeros, add_each, (3,))
    return jnp.stack(sums, axis=-1)


def _fold_replicate(d: jax.Array, r: int) -> jax.Array:
    """The adjoint of `_pad_replicate`: (B, H + 2r, W + 2r, C) -> (B, H, W, C), each border
    band summed into the edge row / column it copies."""
    for axis in (1, 2):
        n = d.shape[axis] - 2 * r
        if n == 1:
            d = jnp.sum(d, axis=axis, keepdims=True)
            continue
        first = jnp.sum(jax.lax.slice_in_dim(d, 0, r + 1, axis=axis), axis=axis, keepdims=True)
        middle = jax.lax.slice_in_dim(d, r + 1, r + n - 1, axis=axis)
        last = jnp.sum(
            jax.lax.slice_in_dim(d, r + n - 1, n + 2 * r, axis=axis), axis=axis, keepdims=True
        )
        d = jnp.concatenate([first, middle, last], axis=axis)
    return d


def _filter_bwd(
    k: int, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """d taps by `_tap_gradients`; d x is the filter run backwards (every padded pixel gathers
    g * taps from the k*k outputs that read it, in the merged layout of `_filter_padded`),
    folded back through the replicate padding."""
    x, taps = recomputed(g, *residuals)
    xpad = _pad_replicate(x, k)
    _, h, w, _ = g.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dtaps = _tap_gradients(xpad, g, k)
    r = k - 1
    edges = ((0, 0), (r, r), (r, r), (0, 0))
    gpad, tpad = jnp.pad(g, edges), jnp.pad(taps, edges)
    c = g.shape[-1]
    flat = _merge_minor(gpad)
    hp, wp = h + r, w + r
    dxpad = jnp.zeros((g.shape[0], hp, wp * c), acc)
    for dy in range(k):
        for dx in range(k):
            ys, xs = r - dy, r - dx
            dxpad = (
                dxpad
                + (flat * _spread(tpad, k * dy + dx, c))[:, ys : ys + hp, xs * c : (xs + wp) * c]
            )
    dxpad = dxpad.reshape(xpad.shape)
    return _fold_replicate(dxpad, k // 2).astype(x.dtype), dtaps.astype(taps.dtype)


def _with_filter_backward(
    forward: Callable[[jax.Array, jax.Array, int], jax.Array],
) -> Callable[[jax.Array, jax.Array, int], jax.Array]:
    """`forward` ((B, H + k - 1, W + k - 1, C) padded features, (B, H, W, k*k) taps, k) ->
    (B, H, W, C) as a function of the unpadded (B, H, W, C) features, differentiated by
    `_filter_bwd` instead of autodiff: only the unpadded features and the taps are kept."""

    def padded_forward(x: jax.Array, taps: jax.Array, k: int) -> jax.Array:
        return forward(_pad_replicate(x, k), taps, k)

    filter_fn = jax.custom_vjp(padded_forward, nondiff_argnums=(2,))
    filter_fn.defvjp(lambda x, taps, k: (padded_forward(x, taps, k), (x, taps)), _filter_bwd)
    return filter_fn


# Per lowering platform (`jax.lax.platform_dependent`'s names), the largest B * H * W * C that
# runs the channels-first forward pass; larger inputs, and every input on platforms not listed,
# run the merged layout ("shifted"). From bench/filter.py on an H200
# (bench/results/h200-2026-11-27-b/filter_merged.md), where a call at 256^2 is launch-bound:
# channels-first 0.20 / 0.27 ms forward at C = 30 / 60 (2.0 / 3.9 M elements) against the
# merged layout's 0.29 / 0.31 ms, but at 1024^2 (31 / 63 M) 3.08 / 4.33 against 2.37 / 2.72 ms.
# Lines through these points cross at about 5.3 M elements at both widths (forward + backward:
# 1.5 M at C = 30, 8.5 M at C = 60), and the channels-first times at 256^2 of other runs
# (0.2-0.5 ms) put the forward crossing as low as 1.5 M. The limit 2^22 (4.2 M) leaves 512^2 x 30
# (7.9 M) and MFF's padded 520^2 inputs, 528^2 x 30 (8.4 M), where the lines put channels-first
# 9-11 % behind, to the merged layout; 512^2 itself is not measured. On CPU the merged layout
# is within noise of channels-first forward and 32-56 % faster forward + backward at every
# size (README).
_CHANNELS_FIRST_UP_TO: dict[str, int] = {"cuda": 1 << 22}
# What every other platform and size runs.
_GENERAL_FORMULATION = "shifted"


def default_formulation(platform: str, shape: tuple[int, ...]) -> str:
    """The `FORMULATIONS` key `dynamic_filter` runs when lowered for `platform` ("cpu", "cuda",
    "rocm", "tpu": `jax.export.default_export_platform()` names the local one) on (B, H, W, C)
    features of `shape`."""
    channels_first = math.prod(shape) <= _CHANNELS_FIRST_UP_TO.get(platform, 0)
    return "channels_first" if channels_first else _GENERAL_FORMULATION


def _model_forward(xpad: jax.Array, taps: jax.Array, k: int) -> jax.Array:
    """`_filter_padded` or `_filter_cf_padded`, whichever `default_formulation` names for the
    size of the features and the platform the program is lowered for: both are traced, and
    `jax.lax.platform_dependent` compiles only that platform's, so the choice holds for
    ahead-of-time lowering, `jax.export` and any mix of backends in one process."""
    shape = (*taps.shape[:3], xpad.shape[-1])
    forwards = {"shifted": _filter_padded, "channels_first": _filter_cf_padded}
    per_platform = {
        platform: functools.partial(forwards[default_formulation(platform, shape)], k=k)
        for platform in _CHANNELS_FIRST_UP_TO
    }
    return jax.lax.platform_dependent(
        xpad, taps, default=functools.partial(forwards[_GENERAL_FORMULATION], k=k), **per_platform
    )


_filter = _with_filter_backward(_filter_padded)
_filter_cf = _with_filter_backward(_filter_cf_padded)
_model_filter = _with_filter_backward(_model_forward)


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter(x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE) -> jax.Array:
    """Per-pixel dynamic filter, the model's path: the formulation `default_formulation` picks
    for the platform it is lowered for and the size of `x` (both materialise no unfolded tensor
    and share one backward pass).

    Args:
        x: (B, H, W, C) features.
        taps: (B, H, W, kernel_size**2) per-pixel taps, row-major over the window.
        kernel_size: odd window size; the input is replicate-padded by kernel_size // 2.

    Returns:
        (B, H, W, C) filtered features.
    """
    _check(x, taps, kernel_size)
    return _model_filter(x, taps, kernel_size)


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter_shifted(
    x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE
) -> jax.Array:
    """`dynamic_filter` as k*k fused shifted multiply-adds on the merged (B, H, W * C) layout
    (`_filter_padded`) on every backend and size."""
    _check(x, taps, kernel_size)
    return _filter(x, taps, kernel_size)


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter_unfold(
    x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE
) -> jax.Array:
    """Reference unfold formulation of `dynamic_filter` (materialises (B, H, W, C, k*k))."""
    _check(x, taps, kernel_size)
    _, h, w, _ = x.shape
    k = kernel_size
    xpad = _pad_replicate(x, k)
    patches = jnp.stack(
        [xpad[:, dy : dy + h, dx : dx + w, :] for dy in range(k) for dx in range(k)], axis=-1
    )
    return jnp.einsum("bhwct,bhwt->bhwc", patches, taps, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- alternatives
# Other formulations of the same filter, for `bench/filter.py` and platform-specific choice.
# They take and return what `dynamic_filter` does; all but the channels-first one are
# differentiated by JAX's autodiff.


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter_patches(
    x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE
) -> jax.Array:
    """`dynamic_filter` as XLA's patch extraction (`lax.conv_general_dilated_patches`, an
    identity convolution) followed by a per-pixel contraction; materialises (B, H, W, C, k*k)."""
    _check(x, taps, kernel_size)
    b, h, w, c = x.shape
    k = kernel_size
    patches = jax.lax.conv_general_dilated_patches(
        _pad_replicate(x, k),
        (k, k),
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # (B, H, W, C * k*k), channel-major
    return jnp.einsum(
        "bhwct,bhwt->bhwc",
        patches.reshape(b, h, w, c, k * k),
        taps,
        precision=jax.lax.Precision.HIGHEST,
    )


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter_loop(x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE) -> jax.Array:
    """`dynamic_filter` as a `lax.fori_loop` over the k*k taps (one dynamic-slice multiply-add
    per iteration): a program of constant size, but the accumulator makes a round trip through
    memory at every tap."""
    _check(x, taps, kernel_size)
    b, h, w, c = x.shape
    k = kernel_size
    xpad = _pad_replicate(x, k)

    def tap(t: jax.Array, out: jax.Array) -> jax.Array:
        shifted = jax.lax.dynamic_slice(xpad, (0, t // k, t % k, 0), (b, h, w, c))
        return out + shifted * jax.lax.dynamic_slice_in_dim(taps, t, 1, axis=-1)

    out = jax.lax.fori_loop(
        0, k * k, tap, jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))
    )
    return out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames="kernel_size")
def dynamic_filter_channels_first(
    x: jax.Array, taps: jax.Array, kernel_size: int = KERNEL_SIZE
) -> jax.Array:
    """`dynamic_filter` with a channels-first forward pass (`_filter_cf_padded`) and the
    default's backward pass (`_filter_bwd`, which is faster channels-last on CPU)."""
    _check(x, taps, kernel_size)
    return _filter_cf(x, taps, kernel_size)


# name -> (x (B, H, W, C), taps (B, H, W, k*k), kernel_size=7) -> (B, H, W, C).
FORMULATIONS: dict[str, Callable[..., jax.Array]] = {
    "shifted": dynamic_filter_shifted,
    "unfold": dynamic_filter_unfold,
    "patches": dynamic_filter_patches,
    "loop": dynamic_filter_loop,
    "channels_first": dynamic_filter_channels_first,
}


class KernelPredictor(nnx.Module):
    """conv3x3 -> LReLU(0.1) -> conv3x3 -> LReLU(0.1) -> conv1x1: (B, H, W, C) -> (B, H, W, 49)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, num_taps: int = NUM_TAPS):
        self.conv1 = ConvAct(channels, channels, 3, lrelu(0.1), rngs=rngs)
        self.conv2 = ConvAct(channels, channels, 3, lrelu(0.1), rngs=rngs)
        self.to_taps = conv(channels, num_taps, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.to_taps(self.conv2(self.conv1(x)))
