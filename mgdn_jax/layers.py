"""Small building blocks shared by the MGDN modules."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's default Conv2d / Linear weight initialisation (kaiming-uniform with a = sqrt(5)).
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    dilation: int = 1,
) -> nnx.Conv:
    """A stride-1 NHWC convolution with explicit zero padding that keeps H and W."""
    pad = dilation * (kernel_size - 1) // 2
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        kernel_init=torch_default_init,
        rngs=rngs,
    )


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


def lrelu(slope: float) -> Callable[[jax.Array], jax.Array]:
    """LeakyReLU with the given negative slope, as a named function (a static module field)."""
    return functools.partial(jax.nn.leaky_relu, negative_slope=slope)


class DepthwiseConv3x3(nnx.Module):
    """Depthwise 3x3 convolution (zero padding 1, with bias) as nine fused shifted
    multiply-adds, which XLA:CPU runs far faster than a grouped convolution.

    Parameters are laid out as a grouped `nnx.Conv` would hold them: kernel (3, 3, 1, C).
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(torch_default_init(rngs.params(), (3, 3, 1, channels)))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        _, h, w, _ = x.shape
        xpad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        kernel = self.kernel[...]
        out = jnp.broadcast_to(self.bias[...], x.shape)
        for dy in range(3):
            for dx in range(3):
                out = out + xpad[:, dy : dy + h, dx : dx + w, :] * kernel[dy, dx, 0]
        return out
