"""Small building blocks shared by the MGDN modules."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
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
    groups: int = 1,
    use_bias: bool = True,
) -> nnx.Conv:
    """A stride-1 NHWC convolution with explicit zero padding that keeps H and W."""
    pad = dilation * (kernel_size - 1) // 2
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=use_bias,
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
