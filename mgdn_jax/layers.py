"""Small building blocks shared by the MGDN modules."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# PyTorch's default Conv2d / Linear weight initialisation (kaiming-uniform with a = sqrt(5)).
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def depend_on(values: Any, scalar: jax.Array) -> Any:
    """`values` (a pytree of arrays) with 0 * `scalar` added to every floating leaf: equal
    values that XLA can only compute after `scalar`. (XLA:CPU removes optimization barriers
    before it schedules, and does not fold x * 0 for floats, which may be NaN.)"""
    zero = scalar.astype(jnp.float32) * 0.0

    def add(leaf: jax.Array) -> jax.Array:
        return leaf + zero.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(add, values)


def recomputed(g: Any, *residuals: Any) -> tuple[Any, ...]:
    """`residuals` made to depend on the output cotangent `g` (a pytree), for backward passes
    that recompute values from them: otherwise XLA merges the recomputation with the identical
    forward computation (`jax.checkpoint`'s barriers are gone by then) and keeps the forward
    intermediates alive until the backward pass."""
    return depend_on(residuals, jax.tree.leaves(g)[0].reshape(-1)[0])


def grads_together(fn: Callable[[Any, Any], Any], remat: bool = False) -> Callable[[Any, Any], Any]:
    """`fn(inputs, params)` (pytrees of arrays), differentiated so that the cotangents of
    `inputs` depend on those of `params`: the backward pass computes a layer's parameter
    gradients before it moves on to the layers below.

    The input cotangents are on the critical path of the backward pass; parameter gradients
    (bias sums, norm-scale sums, kernel contractions) are not, and XLA:CPU's scheduler leaves
    many of them to the very end of the step (next to the gradient-norm and optimizer ops),
    keeping every layer's output cotangent and inputs alive until then. The input cotangents
    get zero times the largest parameter-gradient entry added (`depend_on`): a data
    dependency that costs one scalar per layer. (A non-finite parameter gradient makes the
    input gradients NaN, which a non-finite step reports either way.) The max, not a sum: XLA
    folds a sum of sums into one reduction of the layer's cotangent, which would leave the
    parameter gradients themselves unordered.

    The forward pass keeps what `jax.vjp` of `fn` keeps, or with `remat` only `inputs` and
    `params`: the backward pass then recomputes `fn` (after its output cotangent, see
    `recomputed`).
    """

    @jax.custom_vjp
    def together(inputs: Any, params: Any) -> Any:
        return fn(inputs, params)

    def together_fwd(inputs: Any, params: Any) -> tuple[Any, Any]:
        if remat:
            return fn(inputs, params), (inputs, params)
        return jax.vjp(fn, inputs, params)

    def together_bwd(residuals: Any, g: Any) -> tuple[Any, Any]:
        if remat:
            vjp_fn = jax.vjp(fn, *recomputed(g, *residuals))[1]
        else:
            vjp_fn = residuals
        d_inputs, d_params = vjp_fn(g)
        maxima = jnp.stack([jnp.max(p).astype(jnp.float32) for p in jax.tree.leaves(d_params)])
        # The last of the sorted maxima, not their max: XLA rewrites a max over stacked values
        # into a chain of scalar maximums and fuses that chain into every element of the input
        # cotangents, while a sort it computes once.
        largest = jnp.sort(maxima)[-1]
        return depend_on(d_inputs, largest), d_params

    together.defvjp(together_fwd, together_bwd)
    return together


_TIED = [True]


@contextlib.contextmanager
def untied() -> Iterator[None]:
    """Within it, `tied` calls methods directly: for forward-only passes that inspect the
    modules' calls (`nnx.capture` records the calls of the model's own modules, not of the
    copies that `tied` differentiates)."""
    _TIED[0] = False
    try:
        yield
    finally:
        _TIED[0] = True


def tied(
    module: nnx.Module, method: Callable[..., Any] | None = None, remat: bool = False
) -> Callable[..., Any]:
    """`method(module, *inputs, **constants)` (default: the module's call) through
    `grads_together`, with `remat` recomputed in the backward pass from its inputs.
    Positional arguments are the differentiated inputs, keyword arguments constants. Modules
    call it from their own `__call__` with their forward pass as `method`, so that the call
    stays theirs (`nnx.capture` records it)."""
    method = method or type(module).__call__
    if not _TIED[0]:
        return functools.partial(method, module)
    graphdef, state = nnx.split(module)

    def call(*inputs: Any, **constants: Any) -> Any:
        def apply(inputs: tuple, state: nnx.State) -> Any:
            return method(nnx.merge(graphdef, state), *inputs, **constants)

        return grads_together(apply, remat)(inputs, state)

    return call


def _pad(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size - 1) // 2


def _conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """(B, H, W, I) * (k, k, I, O) -> (B, H, W, O), stride 1, zero padding that keeps H, W.

    Lowered for CPU (`jax.lax.platform_dependent`), O two short of a multiple of 16 (MFF's and
    GDSR's 30) gets two zero filters whose outputs are sliced off: XLA:CPU's convolution
    (YNNPACK) computes 32 channels 10-20 % faster than 30 (4 x 128^2 x 30 -> 30, 3x3:
    21-25 ms -> 17-19 ms, the slice fused into what follows).
    """
    pad = _pad(kernel.shape[0], dilation)

    def convolve(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding=((pad, pad), (pad, pad)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    out = kernel.shape[-1]
    extra = -out % 16
    if not 0 < extra <= 2:
        return convolve(x, kernel)

    def widened(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return convolve(x, jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, extra))))[..., :out]

    return jax.lax.platform_dependent(x, kernel, cpu=widened, default=convolve)


def add_each(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The reducer of a variadic `jax.lax.reduce` that sums each operand on its own."""
    return tuple(x + y for x, y in zip(a, b))


def kernel_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """The kernel gradient of a matmul over the last axis: (..., I) inputs and (..., O)
    output cotangent -> (I, O), summed over all leading positions as one (P, I)^T (P, O)
    product of the maps as they lie.

    Lowered for CPU (`jax.lax.platform_dependent`), for O <= 3 and at most 32 products I * O
    (the local branch's 3 -> 3 convolution, a 1-channel head) it is one variadic reduction of
    the I * O channel products instead (float32 sums), a single pass over both maps: XLA:CPU's
    dot is several times slower on such thin products (4 x 128^2: the nine taps of a 3 -> 3
    3x3 conv 6.4 -> 1.0 ms, of a 30 -> 1 one 36.7 -> 3.6 ms). At O = 6, or O = 30 from I = 3,
    the dot is faster; 90 products (30 -> 3) are faster as sums too, but made the MFF training
    step's program larger (compile 18 -> 26 s, peak RSS +140 MB).
    """
    i, o = x.shape[-1], g.shape[-1]

    def as_matmul(x: jax.Array, g: jax.Array) -> jax.Array:
        return x.reshape(-1, i).T @ g.reshape(-1, o)

    if o > 3 or i * o > 32:
        return as_matmul(x, g)

    def as_sums(x: jax.Array, g: jax.Array) -> jax.Array:
        dtype = jnp.result_type(x, g)
        acc = jnp.promote_types(dtype, jnp.float32)
        products = tuple(
            x[..., a].astype(acc) * g[..., b].astype(acc) for a in range(i) for b in range(o)
        )
        zeros = (jnp.zeros((), acc),) * len(products)
        sums = jax.lax.reduce(products, zeros, add_each, tuple(range(x.ndim - 1)))
        return jnp.stack(sums).reshape(i, o).astype(dtype)

    return jax.lax.platform_dependent(x, g, cpu=as_sums, default=as_matmul)


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
    x, kernel = recomputed(g, *residuals)
    k, _, i, o = kernel.shape
    _, h, w, _ = x.shape
    # d/dx: the transposed convolution, i.e. the spatially flipped kernel with I and O swapped.
    dx = _conv(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), dilation)
    pad = _pad(k, dilation)
    xpad = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = [
        kernel_gradient(
            xpad[:, dy * dilation : dy * dilation + h, dx_ * dilation : dx_ * dilation + w], g
        )
        for dy in range(k)
        for dx_ in range(k)
    ]
    return dx, jnp.stack(taps).reshape(k, k, i, o).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 convolution as a matmul over channels: (..., I) @ (I, O) -> (..., O).

    The backward pass is written out: the kernel gradient is one (P, I)^T (P, O) product of
    the input and the output cotangent as they lie (P: all pixels). Differentiating the
    einsum, XLA:CPU first copies the cotangent channels-first and then contracts against that
    copy, more than twice as slow (65536 x 30 x 30: 5.8 ms against 2.5 ms).
    """
    return x @ kernel


def _pointwise_fwd(
    x: jax.Array, kernel: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ kernel, (x, kernel)


def _pointwise_bwd(
    residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    return g @ kernel.T, kernel_gradient(x, g).astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


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

    def __call__(
        self, x: jax.Array | Sequence[jax.Array], outputs: slice = slice(None)
    ) -> jax.Array:
        """(B, H, W, in) -> (B, H, W, out), or only the output channels `outputs`. A sequence
        of (B, H, W, C_j) maps stands for their channel concatenation, which a 1x1 conv reads
        without building it (one matmul per map with its slice of the kernel, summed)."""
        if isinstance(x, jax.Array | np.ndarray):
            xs = [x]
        else:
            if outputs != slice(None):
                raise ValueError("a sequence of inputs gives every output channel")
            xs = list(x)
            if self.kernel.shape[0] != 1:
                raise ValueError("a sequence of inputs needs a 1x1 convolution")
            if sum(a.shape[-1] for a in xs) != self.kernel.shape[2]:
                raise ValueError(
                    f"inputs have {[a.shape[-1] for a in xs]} channels; the conv takes "
                    f"{self.kernel.shape[2]} in all"
                )
        kernel, bias = self.kernel[...][..., outputs], self.bias[...][outputs]
        dtype = xs[0].dtype
        return grads_together(self._apply)(xs, (kernel.astype(dtype), bias.astype(dtype)))

    def _apply(self, xs: list[jax.Array], params: tuple[jax.Array, jax.Array]) -> jax.Array:
        """The convolution of the maps' channel concatenation: a k x k conv of the one map, or
        for 1x1 the bias plus one matmul per map with its rows of the kernel."""
        kernel, bias = params
        if kernel.shape[0] != 1:
            return conv2d(xs[0], kernel, self.dilation) + bias
        y, start = bias, 0
        for a in xs:
            y = y + pointwise(a, kernel[0, 0, start : start + a.shape[-1]])
            start += a.shape[-1]
        return y


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
    """`module`'s call; with `remat`, through `tied(module, remat=True)`: only its inputs are
    kept for the backward pass, which recomputes its activations."""
    return tied(module, remat=True) if remat else module


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis whose backward pass keeps only its output (differentiating
    it keeps the exponentials too)."""
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y = softmax(x)
    return y, y


def softmax_grad(y: jax.Array, g: jax.Array, axis: int = -1) -> jax.Array:
    """The input cotangent of a softmax over `axis`, from its output y and output cotangent g."""
    return y * (g - jnp.sum(g * y, axis=axis, keepdims=True))


def _softmax_bwd(y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (softmax_grad(y, g),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def leaky_relu(x: jax.Array, negative_slope: float) -> jax.Array:
    """LeakyReLU (slope > 0) whose backward pass reads the sign from its output, which the next
    layer keeps anyway, instead of keeping a mask of its input."""
    return jax.nn.leaky_relu(x, negative_slope)


def _leaky_relu_fwd(x: jax.Array, negative_slope: float) -> tuple[jax.Array, jax.Array]:
    y = leaky_relu(x, negative_slope)
    return y, y


def _leaky_relu_bwd(negative_slope: float, y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (jnp.where(y >= 0, g, negative_slope * g),)


leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


def lrelu(slope: float) -> Callable[[jax.Array], jax.Array]:
    """`leaky_relu` with the given negative slope (> 0), as a named function (a static module
    field)."""
    if slope <= 0:
        raise ValueError(f"leaky_relu needs a positive slope, got {slope}")
    return functools.partial(leaky_relu, negative_slope=slope)


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
    x, kernel = recomputed(g, *residuals)
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

    def __call__(self, x: jax.Array, channels: slice = slice(None)) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C); with `channels`, x holds only those channels and only
        they are filtered."""
        kernel = self.kernel[...][:, :, 0, channels].astype(x.dtype)
        return depthwise_conv(x, kernel) + self.bias[...][channels].astype(x.dtype)
