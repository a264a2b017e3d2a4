"""The per-pixel dynamic filter: both formulations, the formula, gradients, memory, errors."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.test_util import check_grads

from mgdn_jax.dynamic_filter import NUM_TAPS, dynamic_filter, dynamic_filter_unfold

SHAPES = [(1, 5, 7, 3), (2, 9, 6, 30), (1, 4, 11, 30)]


def random_inputs(shape, seed=0, dtype=np.float32, k=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    taps = rng.standard_normal((*shape[:3], k * k)).astype(dtype)
    return x, taps


def numpy_filter(x: np.ndarray, taps: np.ndarray, k: int = 7) -> np.ndarray:
    """The formula in float64, pixel by pixel, with replicate padding as index clipping:

    y[b, i, j, c] = sum_{dy, dx} x[b, clip(i + dy - r), clip(j + dx - r), c] * K[b, i, j, k dy + dx]
    """
    b, h, w, c = x.shape
    r = k // 2
    x, taps = x.astype(np.float64), taps.astype(np.float64)
    y = np.zeros((b, h, w, c))
    for i in range(h):
        for j in range(w):
            rows = np.clip(np.arange(i - r, i + r + 1), 0, h - 1)
            cols = np.clip(np.arange(j - r, j + r + 1), 0, w - 1)
            window = x[:, rows][:, :, cols]  # (B, k, k, C)
            y[:, i, j] = np.einsum("bykc,byk->bc", window, taps[:, i, j].reshape(b, k, k))
    return y


@pytest.mark.parametrize("shape", SHAPES)
def test_default_matches_unfold(shape):
    x, taps = random_inputs(shape)
    np.testing.assert_allclose(
        dynamic_filter(x, taps), dynamic_filter_unfold(x, taps), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_matches_formula(shape):
    x, taps = random_inputs(shape, seed=1)
    expected = numpy_filter(x, taps)
    np.testing.assert_allclose(dynamic_filter(x, taps), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dynamic_filter_unfold(x, taps), expected, rtol=1e-5, atol=1e-5)


def test_matches_formula_float64_and_other_kernel_size():
    with jax.enable_x64(True):
        x, taps = random_inputs((2, 4, 5, 3), seed=2, dtype=np.float64)
        y = dynamic_filter(jnp.asarray(x), jnp.asarray(taps))
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, numpy_filter(x, taps), rtol=1e-12, atol=1e-12)
        x, taps = random_inputs((1, 6, 4, 2), seed=3, dtype=np.float64, k=3)
        y = dynamic_filter(jnp.asarray(x), jnp.asarray(taps), kernel_size=3)
        np.testing.assert_allclose(y, numpy_filter(x, taps, k=3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 3, 4, 2), (2, 1, 5, 1), (1, 4, 1, 2)])
def test_gradients(shape):
    """On a 3x3 window (same code as 7x7, whose gradient takes long to compile): finite
    differences, then the gradients of both formulations against each other; single rows and
    columns fold the whole padding gradient into one edge."""
    with jax.enable_x64(True):
        x, taps = random_inputs(shape, seed=4, dtype=np.float64, k=3)
        filter3 = functools.partial(dynamic_filter, kernel_size=3)
        check_grads(filter3, (jnp.asarray(x), jnp.asarray(taps)), order=1, modes=("rev",))
        weights = np.random.default_rng(5).standard_normal(x.shape)

        def grads(fn):
            def loss(a, b):
                return jnp.sum(fn(a, b, kernel_size=3) * weights)

            return jax.grad(loss, argnums=(0, 1))(x, taps)

        for ours, unfolded in zip(grads(dynamic_filter), grads(dynamic_filter_unfold)):
            np.testing.assert_allclose(ours, unfolded, rtol=1e-12, atol=1e-12)


def _jaxpr_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every variable of a jaxpr and of the jaxprs nested in its equations."""
    shapes = [tuple(v.aval.shape) for v in jaxpr.invars]
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, ClosedJaxpr):
                    shapes += _jaxpr_shapes(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    shapes += _jaxpr_shapes(sub)
    return shapes


def _hlo_shapes(text: str) -> list[tuple[int, ...]]:
    return [
        tuple(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"\b[a-z]+\d+\[([\d,]*)\]", text)
    ]


@pytest.mark.parametrize(
    "fn, materialises", [(dynamic_filter, False), (dynamic_filter_unfold, True)]
)
def test_no_unfolded_tensor(fn, materialises):
    """The default path never holds an array as large as the (B, H, W, C, 49) unfolded
    neighbourhoods, in its jaxpr or in the compiled HLO; the unfold path's jaxpr does (which
    shows that the inspection finds one), and the HLO parser finds the input's shape."""
    b, h, w, c = shape = (2, 5, 6, 3)
    x, taps = random_inputs(shape)
    unfolded = b * h * w * c * NUM_TAPS

    def big(shapes):
        return [s for s in shapes if math.prod(s) >= unfolded]

    jaxpr_big = big(_jaxpr_shapes(jax.make_jaxpr(fn)(x, taps).jaxpr))
    assert bool(jaxpr_big) == materialises, jaxpr_big
    hlo_shapes = _hlo_shapes(fn.lower(x, taps).compile().as_text())
    assert shape in hlo_shapes  # the parser reads the program's arrays
    if not materialises:
        assert not big(hlo_shapes)


@pytest.mark.parametrize(
    "x_shape, taps_shape",
    [
        ((5, 7, 3), (5, 7, 49)),
        ((1, 5, 7, 3), (1, 5, 7, 48)),
        ((1, 5, 7, 3), (1, 5, 6, 49)),
        ((2, 5, 7, 3), (1, 5, 7, 49)),
        ((1, 5, 7, 3), (1, 5, 7, 1, 49)),
    ],
)
@pytest.mark.parametrize("fn", [dynamic_filter, dynamic_filter_unfold])
def test_bad_shapes(fn, x_shape, taps_shape):
    with pytest.raises(ValueError, match="dynamic filter"):
        fn(jnp.zeros(x_shape), jnp.zeros(taps_shape))
