"""MGCA: mutual-guided cross-attention across channels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mgdn_jax.layers import DepthwiseConv3x3, conv

NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
    """x / max(||x||_2, eps) along `axis`, as `torch.nn.functional.normalize`.

    Written as x / sqrt(max(sum(x^2), eps^2)) so the gradient stays finite at x = 0.
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class MGCA(nnx.Module):
    """Channel-wise cross-attention where one input guides the other.

    q = dw3x3(conv1x1(guide)), (k, v) = split(dw3x3(conv1x1(other))); per head, q and k are
    L2-normalised along the pixels and attn = softmax(q k^T * temperature) is a
    (C/heads, C/heads) matrix applied to v; a 1x1 conv projects the result.
    """

    def __init__(self, channels: int, num_heads: int, *, rngs: nnx.Rngs):
        if channels % num_heads:
            raise ValueError(f"MGCA width {channels} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.temperature = nnx.Param(jnp.ones((num_heads,), jnp.float32))
        self.q = conv(channels, channels, 1, rngs=rngs)
        self.q_dwconv = DepthwiseConv3x3(channels, rngs=rngs)
        self.kv = conv(channels, 2 * channels, 1, rngs=rngs)
        self.kv_dwconv = DepthwiseConv3x3(2 * channels, rngs=rngs)
        self.project_out = conv(channels, channels, 1, rngs=rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, heads, C / heads, H * W)."""
        b, h, w, c = x.shape
        return x.reshape(b, h * w, self.num_heads, c // self.num_heads).transpose(0, 2, 3, 1)

    def __call__(self, guide: jax.Array, other: jax.Array) -> jax.Array:
        """(B, H, W, C) guide and other -> (B, H, W, C)."""
        b, h, w, c = guide.shape
        q = self.q_dwconv(self.q(guide))
        k, v = jnp.split(self.kv_dwconv(self.kv(other)), 2, axis=-1)
        q = l2_normalize(self._heads(q))
        k = l2_normalize(self._heads(k))
        logits = jnp.einsum("bncp,bndp->bncd", q, k) * self.temperature[None, :, None, None]
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bncd,bndp->bncp", attn, self._heads(v))
        out = out.transpose(0, 3, 1, 2).reshape(b, h, w, c)
        return self.project_out(out)
