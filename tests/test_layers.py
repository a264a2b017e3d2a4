"""The hand-written backward passes of `mgdn_jax.layers` and `mgdn_jax.transformer` against
JAX's own differentiation of the same functions, and rematerialisation leaving the model's
gradients unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from mgdn_jax.layers import (
    Conv,
    DepthwiseConv3x3,
    _conv,
    _depthwise,
    conv2d,
    depthwise_conv,
    grads_together,
    kernel_gradient,
    leaky_relu,
    lrelu,
    pointwise,
    recomputed,
    softmax,
    tied,
)
from mgdn_jax.model import build_model
from mgdn_jax.transformer import LN_EPS, attend, layer_norm, norm_mlp, project_heads
from mgdn_jax.variants import model_config


def _random(shape: tuple[int, ...], seed: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _grads(fn, *args, cotangent_seed: int = 9):
    out = fn(*args)
    weights = _random(out.shape, cotangent_seed).astype(out.dtype)
    return jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=tuple(range(len(args))))(*args)


def _plain_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """XLA's convolution, zero-padded to keep the size: the reference for `conv2d`."""
    pad = dilation * (kernel.shape[0] // 2)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@pytest.mark.parametrize(("k", "dilation", "out"), [(3, 1, 4), (3, 2, 4), (5, 1, 4), (3, 1, 3)])
def test_conv2d_gradients_match_autodiff(k: int, dilation: int, out: int):
    """Four output channels take the kernel gradient's matmul path, three its reduction."""
    with jax.enable_x64(True):
        x, kernel = _random((2, 9, 7, 3), 0), _random((k, k, 3, out), 1)
        np.testing.assert_allclose(conv2d(x, kernel, dilation), _plain_conv(x, kernel, dilation))
        ours = _grads(lambda a, b: conv2d(a, b, dilation), x, kernel)
        reference = _grads(lambda a, b: _conv(a, b, dilation), x, kernel)
        for got, want in zip(ours, reference):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        check_grads(lambda a, b: conv2d(a, b, dilation), (x, kernel), order=1, modes=("rev",))


def test_conv_with_padded_filters_equals_plain_convolution():
    """30 output channels: computed as 32 on CPU (`_conv`), the same values and gradients."""
    with jax.enable_x64(True):
        args = [_random((2, 7, 6, 5), 32), _random((3, 3, 5, 30), 33)]
        _assert_same_grads(lambda x, k: conv2d(x, k, 2), lambda x, k: _plain_conv(x, k, 2), *args)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_cpu_forms_are_lowered_for_cpu_only(platform: str):
    """A 30-filter convolution computed with 32 filters, and a thin kernel gradient (3 -> 3) as
    sums rather than a dot, are what the program exported for CPU holds, and no other's."""
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 3, 30), jnp.float32)

    def program(fn, *args) -> str:
        return jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()

    widened = "tensor<3x3x3x32xf32>" in program(lambda a, b: _conv(a, b, 1), x, kernel)
    assert widened == (platform == "cpu")
    as_dot = "dot_general" in program(kernel_gradient, x, x)
    assert as_dot == (platform != "cpu")


def test_depthwise_gradients_match_autodiff():
    with jax.enable_x64(True):
        x, kernel = _random((2, 6, 5, 4), 2), _random((3, 3, 4), 3)
        ours = _grads(depthwise_conv, x, kernel)
        reference = _grads(_depthwise, x, kernel)
        for got, want in zip(ours, reference):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        check_grads(depthwise_conv, (x, kernel), order=1, modes=("rev",))


def test_remat_keeps_outputs_and_gradients():
    """A small MGDN in training (stochastic depth drawn): remat=True changes what is stored,
    not what is computed."""
    cfg = model_config("mff")
    cfg.update(embed_dim=12, depths=(1, 1), num_heads=(2, 2), drop_path_rate=0.5)
    graphdef, params = nnx.split(build_model(cfg), nnx.Param)
    x1, x2 = _random((2, 16, 16, 3), 4), _random((2, 16, 16, 3), 5)

    def loss(p: nnx.State, remat: bool) -> jnp.ndarray:
        model = nnx.merge(graphdef, p)
        key = jax.random.PRNGKey(6)  # stochastic depth: the recomputation draws the same drops
        out, features = model(x1, x2, return_features=True, remat=remat, dropout_key=key)
        return jnp.mean(out) + sum(jnp.mean(f**2) for stage in features for f in stage)

    plain, remat = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r) for r in (0, 1))
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _assert_same_grads(fn, reference, *args):
    """Values, then gradients of a random projection of the output, in float64."""
    np.testing.assert_allclose(fn(*args), reference(*args), rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(fn, *args), _grads(reference, *args)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _plain_layer_norm(x, scale, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + LN_EPS) * scale + bias


def test_layer_norm_matches_definition_and_autodiff():
    with jax.enable_x64(True):
        x, scale, bias = _random((2, 5, 4, 6), 10), _random((6,), 11), _random((6,), 12)
        _assert_same_grads(layer_norm, _plain_layer_norm, x * 3 + 1, scale, bias)
        check_grads(layer_norm, (x, scale, bias), order=1, modes=("rev",))


def test_norm_mlp_matches_definition_and_autodiff():
    def plain(t, *params):
        scale, bias, w1, b1, w2, b2 = params
        h = _plain_layer_norm(t, scale, bias) @ w1 + b1
        return jax.nn.gelu(h, approximate=False) @ w2 + b2

    def ours(t, *params):
        return norm_mlp(t, params)

    shapes = [(2, 3, 4, 5), (5,), (5,), (5, 7), (7,), (7, 5), (5,)]
    with jax.enable_x64(True):
        args = [_random(shape, 20 + i) for i, shape in enumerate(shapes)]
        _assert_same_grads(ours, plain, *args)
        check_grads(ours, tuple(args), order=1, modes=("rev",))


@pytest.mark.parametrize(("i", "o"), [(3, 3), (5, 1), (4, 6), (10, 3)])
def test_kernel_gradient_is_the_summed_outer_product(i: int, o: int):
    """Both paths (a matmul, or for thin outputs a reduction on CPU) give sum_p x_p^T g_p, in
    float64 and, summed in float32, from bfloat16 maps."""
    rng = np.random.default_rng(i)
    x, g = rng.standard_normal((2, 6, 7, i)), rng.standard_normal((2, 6, 7, o))
    want = np.einsum("bhwi,bhwo->io", x, g)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            kernel_gradient(jnp.asarray(x), jnp.asarray(g)), want, rtol=1e-12
        )
    xb, gb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    got = kernel_gradient(xb, gb)
    assert got.dtype == jnp.bfloat16 and got.shape == (i, o)
    exact = np.einsum("bhwi,bhwo->io", np.asarray(xb, np.float64), np.asarray(gb, np.float64))
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2e-2, atol=0.2)


def test_pointwise_matches_einsum_and_autodiff():
    def plain(x, kernel):
        return jnp.einsum("bhwi,io->bhwo", x, kernel)

    with jax.enable_x64(True):
        args = [_random((2, 5, 3, 4), 30), _random((4, 6), 31)]
        _assert_same_grads(pointwise, plain, *args)
        check_grads(pointwise, tuple(args), order=1, modes=("rev",))


def test_project_heads_matches_einsum_and_autodiff():
    def plain(x, kernel, bias):
        return jnp.einsum("bnc,chd->bhnd", x, kernel) + bias[:, None, :]

    with jax.enable_x64(True):
        args = [_random((3, 16, 6), 40), _random((6, 2, 3), 41), _random((2, 3), 42)]
        _assert_same_grads(project_heads, plain, *args)
        check_grads(project_heads, tuple(args), order=1, modes=("rev",))


@pytest.mark.parametrize("windows", [1, 3])
def test_attend_matches_definition_and_autodiff(windows: int):
    """Window attention's core, with a mask per window (3) or one for all (1), against
    differentiating the plain formula."""
    mask = jnp.asarray(np.where(np.random.default_rng(50).random((windows, 4, 4)) < 0.4, -9, 0.0))

    def plain(q, k, v, bias):
        logits = jnp.einsum("bhnd,bhmd->bhnm", q, k) + bias
        logits = (logits.reshape(2, windows, 2, 4, 4) + mask[None, :, None]).reshape(-1, 2, 4, 4)
        return jnp.einsum("bhnm,bhmd->bhnd", jax.nn.softmax(logits, axis=-1), v)

    def ours(q, k, v, bias):
        return attend(q, k, v, bias, mask)

    with jax.enable_x64(True):
        shapes = [(2 * windows, 2, 4, 3)] * 3 + [(2, 4, 4)]
        args = [_random(shape, 51 + i) for i, shape in enumerate(shapes)]
        _assert_same_grads(ours, plain, *args)
        check_grads(ours, tuple(args), order=1, modes=("rev",))


def test_softmax_and_leaky_relu_match_autodiff():
    with jax.enable_x64(True):
        x = _random((3, 4, 7), 30) * 4
        _assert_same_grads(softmax, lambda a: jax.nn.softmax(a, axis=-1), x)
        for slope in (0.1, 0.2):
            _assert_same_grads(
                lambda a, s=slope: leaky_relu(a, s),
                lambda a, s=slope: jax.nn.leaky_relu(a, s),
                x,
            )
    with pytest.raises(ValueError, match="positive slope"):
        lrelu(0.0)


@pytest.mark.parametrize("remat", [False, True])
def test_grads_together_keeps_values_and_gradients(remat: bool):
    def fn(inputs, params):
        x, y = inputs
        w, b = params
        return jnp.tanh(x @ w + b) * y

    with jax.enable_x64(True):
        inputs = (_random((6, 3), 40), _random((6, 4), 41))
        params = (_random((3, 4), 42), _random((4,), 43))
        tied_fn = grads_together(fn, remat)
        _assert_same_grads(
            lambda x, y, w, b: tied_fn((x, y), (w, b)),
            lambda x, y, w, b: fn((x, y), (w, b)),
            *inputs,
            *params,
        )


def test_recomputed_returns_the_residuals():
    x, y = _random((4, 3), 50), _random((2,), 51)
    got = recomputed(_random((5,), 52), x, y)
    for a, b in zip(got, (x, y)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("remat", [False, True])
def test_tied_module_matches_plain_call(remat: bool):
    conv = Conv(5, 4, 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(conv)
    x = _random((2, 6, 6, 5), 60).astype(jnp.float32)

    def loss(p, wrap):
        module = nnx.merge(graphdef, p)
        return jnp.sum(jnp.sin(wrap(module)(x)))

    plain = jax.grad(loss)(params, lambda m: m)
    wrapped = jax.grad(loss)(params, lambda m: tied(m, remat=remat))
    for got, want in zip(jax.tree.leaves(wrapped), jax.tree.leaves(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_conv_of_a_sequence_equals_conv_of_concatenation():
    conv = Conv(7, 4, 1, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(conv)
    a, b = _random((2, 5, 5, 3), 70), _random((2, 5, 5, 4), 71)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    np.testing.assert_allclose(
        conv([a, b]), conv(jnp.concatenate([a, b], -1)), rtol=1e-5, atol=1e-6
    )

    def loss(p, split):
        module = nnx.merge(graphdef, p)
        y = module([a, b]) if split else module(jnp.concatenate([a, b], -1))
        return jnp.sum(jnp.cos(y))

    for got, want in zip(*(jax.tree.leaves(jax.grad(loss)(params, s)) for s in (True, False))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        conv([a, a])
    with pytest.raises(ValueError, match="1x1"):
        Conv(3, 3, 3, rngs=nnx.Rngs(2))([a])


def test_conv_and_depthwise_output_channel_slices():
    conv = Conv(5, 6, 3, rngs=nnx.Rngs(3))
    x = _random((2, 6, 6, 5), 80).astype(jnp.float32)
    np.testing.assert_allclose(conv(x, outputs=slice(2, 5)), conv(x)[..., 2:5], rtol=1e-6)
    depthwise = DepthwiseConv3x3(6, rngs=nnx.Rngs(4))
    y = _random((2, 6, 6, 6), 81).astype(jnp.float32)
    np.testing.assert_allclose(
        depthwise(y[..., 3:], channels=slice(3, 6)), depthwise(y)[..., 3:], rtol=1e-6
    )
    with pytest.raises(ValueError, match="every output channel"):
        Conv(6, 4, 1, rngs=nnx.Rngs(5))([y[..., :3], y[..., 3:]], outputs=slice(0, 2))
