"""The hand-written backward passes of `mgdn_jax.layers` against JAX's own differentiation of
the same functions, and rematerialisation leaving the model's gradients unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from mgdn_jax.layers import _conv, _depthwise, conv2d, depthwise_conv
from mgdn_jax.model import build_model
from mgdn_jax.variants import model_config


def _random(shape: tuple[int, ...], seed: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _grads(fn, *args, cotangent_seed: int = 9):
    out = fn(*args)
    weights = _random(out.shape, cotangent_seed).astype(out.dtype)
    return jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize(("k", "dilation"), [(3, 1), (3, 2), (5, 1)])
def test_conv2d_gradients_match_autodiff(k: int, dilation: int):
    with jax.enable_x64(True):
        x, kernel = _random((2, 9, 7, 3), 0), _random((k, k, 3, 4), 1)
        np.testing.assert_allclose(conv2d(x, kernel, dilation), _conv(x, kernel, dilation))
        ours = _grads(lambda a, b: conv2d(a, b, dilation), x, kernel)
        reference = _grads(lambda a, b: _conv(a, b, dilation), x, kernel)
        for got, want in zip(ours, reference):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        check_grads(lambda a, b: conv2d(a, b, dilation), (x, kernel), order=1, modes=("rev",))


def test_depthwise_gradients_match_autodiff():
    with jax.enable_x64(True):
        x, kernel = _random((2, 6, 5, 4), 2), _random((3, 3, 4), 3)
        ours = _grads(depthwise_conv, x, kernel)
        reference = _grads(_depthwise, x, kernel)
        for got, want in zip(ours, reference):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        check_grads(depthwise_conv, (x, kernel), order=1, modes=("rev",))


def test_remat_keeps_outputs_and_gradients():
    """A small MGDN: remat=True changes what is stored, not what is computed."""
    cfg = model_config("mff")
    cfg.update(embed_dim=12, depths=(1, 1), num_heads=(2, 2))
    graphdef, params = nnx.split(build_model(cfg), nnx.Param)
    x1, x2 = _random((2, 16, 16, 3), 4), _random((2, 16, 16, 3), 5)

    def loss(p: nnx.State, remat: bool) -> jnp.ndarray:
        out, features = nnx.merge(graphdef, p)(x1, x2, return_features=True, remat=remat)
        return jnp.mean(out) + sum(jnp.mean(f**2) for stage in features for f in stage)

    plain, remat = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r) for r in (0, 1))
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
