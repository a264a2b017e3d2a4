"""MGCA against the formula in float64 NumPy, and the F.normalize factor against PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgdn_jax.mgca import MGCA, inverse_norm


def conv1x1(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(B, H, W, I) with an HWIO (1, 1, I, O) kernel -> (B, H, W, O)."""
    return x @ kernel[0, 0] + bias


def depthwise3x3(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Zero-padded per-channel 3x3 correlation; kernel (3, 3, 1, C)."""
    _, h, w, _ = x.shape
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            y += xpad[:, dy : dy + h, dx : dx + w] * kernel[dy, dx, 0]
    return y + bias


def heads(x: np.ndarray, n: int) -> np.ndarray:
    """(B, H, W, C) -> (B, heads, C / heads, H * W), channel c = head * (C / heads) + i."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, n, c // n).transpose(0, 2, 3, 1)


def random_mgca(channels: int, num_heads: int, rng: np.random.Generator) -> MGCA:
    """An MGCA with every parameter drawn at random (no initialiser to compile)."""
    module = nnx.eval_shape(lambda: MGCA(channels, num_heads, rngs=nnx.Rngs(0)))
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        var.set_value(jnp.asarray(0.5 * rng.standard_normal(var.shape), jnp.float32))
    module.temperature.set_value(jnp.asarray(rng.uniform(0.5, 3.0, num_heads), jnp.float32))
    return module


def numpy_mgca(module: MGCA, guide: np.ndarray, other: np.ndarray) -> np.ndarray:
    p = {
        name: (
            np.asarray(getattr(module, name).kernel.get_value(), np.float64),
            np.asarray(getattr(module, name).bias.get_value(), np.float64),
        )
        for name in ("q", "q_dwconv", "kv", "kv_dwconv", "project_out")
    }
    n = module.num_heads
    b, h, w, c = guide.shape
    q = depthwise3x3(conv1x1(guide.astype(np.float64), *p["q"]), *p["q_dwconv"])
    kv = depthwise3x3(conv1x1(other.astype(np.float64), *p["kv"]), *p["kv_dwconv"])
    q, k, v = heads(q, n), heads(kv[..., :c], n), heads(kv[..., c:], n)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    temperature = np.asarray(module.temperature.get_value(), np.float64)
    logits = q @ k.transpose(0, 1, 3, 2) * temperature[None, :, None, None]
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 3, 1, 2).reshape(b, h, w, c)
    return conv1x1(out, *p["project_out"])


def test_mgca_matches_formula():
    shape, num_heads = (2, 5, 7, 30), 6  # the released width 30 and 6 heads of 5 channels
    rng = np.random.default_rng(0)
    module = random_mgca(shape[-1], num_heads, rng)
    guide = rng.standard_normal(shape).astype(np.float32)
    other = rng.standard_normal(shape).astype(np.float32)
    expected = numpy_mgca(module, guide, other)
    np.testing.assert_allclose(module(guide, other), expected, rtol=1e-5, atol=1e-5)
    # The roles are not symmetric: the guide gives the queries, the other input keys and values.
    assert not np.allclose(module(other, guide), expected, atol=1e-3)


def test_mgca_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        MGCA(10, 6, rngs=nnx.Rngs(0))


def test_normalize_matches_torch():
    import torch

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 9)).astype(np.float32)
    x[1, 2] = 0.0  # a zero vector stays zero
    x[2, 0] = 1e-20  # below eps: divided by eps, not by its norm
    for axis in (-1, 1):
        expected = torch.nn.functional.normalize(torch.from_numpy(x), dim=axis).numpy()
        np.testing.assert_allclose(x * inverse_norm(x, axis=axis), expected, rtol=1e-6, atol=1e-7)


def test_normalize_gradient_finite_at_zero():
    def loss(x):
        return jnp.sum(x * inverse_norm(x) * jnp.arange(x.shape[-1]))

    grad = jax.grad(loss)(jnp.zeros((2, 5)))
    assert np.all(np.isfinite(grad))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5)), jnp.float32)
    assert np.all(np.isfinite(jax.grad(loss)(x)))
