"""Small building blocks shared by the MGDN modules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's default Conv2d / Linear weight initialisation (kaiming-uniform with a = sqrt(5)).
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pad(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size - 1) // 2


def _conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """(B, H, W, I) * (k, k, I, O) -> (B, H, W, O), stride 1, zero padding that keeps H, W."""
    pad = _pad(kernel.shape[0], dilation)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, kernel: jax.Array, dilation: int = 1) -> jax.Array:
    """Stride-1 convolution with zero padding that keeps H and W: (B, H, W, I) * (k, k, I, O)
    -> (B, H, W, O), k odd.

    The same function as `jax.lax.conv_general_dilated`, with a hand-written backward pass: the
    kernel gradient is k*k (B*H*W, I)^T (B*H*W, O) matmuls over shifted views of the padded
    input, which XLA:CPU runs several times faster than the convolution it would emit.
    """
    return _conv(x, kernel, dilation)


def _conv2d_fwd(
    x: jax.Array, kernel: jax.Array, dilation: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv(x, kernel, dilation), (x, kernel)


def _conv2d_bwd(
    dilation: int, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    k, _, i, o = kernel.shape
    _, h, w, _ = x.shape
    # d/dx: the transposed convolution, i.e. the spatially flipped kernel with I and O swapped.
    dx = _conv(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), dilation)
    pad = _pad(k, dilation)
    xpad = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    g2 = g.reshape(-1, o)
    taps = [
        xpad[:, dy * dilation : dy * dilation + h, dx_ * dilation : dx_ * dilation + w]
        .reshape(-1, i)
        .T
        @ g2
        for dy in range(k)
        for dx_ in range(k)
    ]
    return dx, jnp.stack(taps).reshape(k, k, i, o).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nnx.Module):
    """A stride-1 NHWC convolution with bias and explicit zero padding that keeps H and W.

    Parameters as `nnx.Conv` names them: kernel (k, k, in, out) (HWIO) and bias (out,). A 1x1
    convolution is computed as a matmul over channels.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        rngs: nnx.Rngs,
        dilation: int = 1,
    ):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel size {kernel_size} must be odd")
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(torch_default_init(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.dilation = dilation

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in) -> (B, H, W, out)."""
        kernel = self.kernel[...].astype(x.dtype)
        if kernel.shape[0] == 1:
            y = jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
        else:
            y = conv2d(x, kernel, self.dilation)
        return y + self.bias[...].astype(x.dtype)


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    dilation: int = 1,
) -> Conv:
    """A stride-1 NHWC `Conv` with explicit zero padding that keeps H and W."""
    return Conv(in_features, out_features, kernel_size, rngs=rngs, dilation=dilation)


class ConvAct(nnx.Module):
    """A `conv` followed by an activation, e.g. conv3x3 -> LReLU(0.1)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        activation: Callable[[jax.Array], jax.Array],
        *,
        rngs: nnx.Rngs,
    ):
        self.conv = conv(in_features, out_features, kernel_size, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.activation(self.conv(x))


def checkpointed(module: nnx.Module, remat: bool) -> Callable[..., Any]:
    """`module`'s call, under `nnx.remat` when `remat` is set: only its inputs are kept for the
    backward pass, which recomputes its activations."""
    if not remat:
        return module
    return functools.partial(nnx.remat(lambda m, *args: m(*args)), module)


def lrelu(slope: float) -> Callable[[jax.Array], jax.Array]:
    """LeakyReLU with the given negative slope, as a named function (a static module field)."""
    return functools.partial(jax.nn.leaky_relu, negative_slope=slope)


def _depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, H, W, C) * (k, k, C) -> (B, H, W, C), zero padding k // 2, as k*k fused shifted
    multiply-adds."""
    k = kernel.shape[0]
    r = k // 2
    _, h, w, _ = x.shape
    xpad = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    out = jnp.zeros(x.shape, x.dtype)
    for dy in range(k):
        for dx in range(k):
            out = out + xpad[:, dy : dy + h, dx : dx + w, :] * kernel[dy, dx]
    return out


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise convolution (B, H, W, C) * (k, k, C) -> (B, H, W, C), zero padding k // 2, k
    odd, without bias. The backward pass is written out: d/dx is the same filter with the kernel
    flipped, d/dkernel nine per-channel reductions, so no shifted copies are materialised."""
    return _depthwise(x, kernel)


def _depthwise_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple]:
    return _depthwise(x, kernel), (x, kernel)


def _depthwise_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple:
    x, kernel = residuals
    k = kernel.shape[0]
    r = k // 2
    _, h, w, _ = x.shape
    xpad = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    dkernel = jnp.stack(
        [
            jnp.sum(xpad[:, dy : dy + h, dx : dx + w, :] * g, axis=(0, 1, 2))
            for dy in range(k)
            for dx in range(k)
        ]
    )
    return _depthwise(g, jnp.flip(kernel, (0, 1))), dkernel.reshape(kernel.shape)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv3x3(nnx.Module):
    """Depthwise 3x3 convolution (zero padding 1, with bias) as nine fused shifted
    multiply-adds (`depthwise_conv`), which XLA:CPU runs far faster than a grouped convolution.

    Parameters are laid out as a grouped `nnx.Conv` would hold them: kernel (3, 3, 1, C).
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(torch_default_init(rngs.params(), (3, 3, 1, channels)))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        kernel = self.kernel[...][:, :, 0].astype(x.dtype)
        return depthwise_conv(x, kernel) + self.bias[...].astype(x.dtype)
