"""MGCA: mutual-guided cross-attention across channels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mgdn_jax.layers import DepthwiseConv3x3, conv, softmax, tied

NORM_EPS = 1e-12


def inverse_norm(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
    """1 / max(||x||_2, eps) along `axis` (kept), the factor of `torch.nn.functional.normalize`.

    Written as rsqrt(max(sum(x^2), eps^2)) so the gradient stays finite at x = 0.
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=True)  # square's derivative would keep a 2x copy
    return jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


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

    def __call__(self, guide: jax.Array, other: jax.Array) -> jax.Array:
        """(B, H, W, C) guide and other -> (B, H, W, C).

        Computed without moving pixels to a minor axis: the full (C, C) Gram matrix q^T k over
        pixels is one matmul, the per-channel norms rescale it (equal to normalising q and k
        first), and its diagonal head blocks give the attention, applied back to v as a
        block-diagonal (C, C) matrix. Recomputed in the backward pass from the two inputs
        (`tied(remat=True)`), which the stage keeps anyway, rather than keeping its q, k and v.
        """
        return tied(self, MGCA._attend, remat=True)(guide, other)

    def _attend(self, guide: jax.Array, other: jax.Array) -> jax.Array:
        b, h, w, c = guide.shape
        heads, per_head = self.num_heads, c // self.num_heads
        q = self.q_dwconv(self.q(guide)).reshape(b, h * w, c)
        k = self._kv(other, slice(0, c)).reshape(b, h * w, c)
        gram = jnp.einsum("bpc,bpd->bcd", q, k)
        inv_q = inverse_norm(q, axis=1)  # (B, 1, C)
        inv_k = inverse_norm(k, axis=1)
        gram = gram * inv_q.transpose(0, 2, 1) * inv_k
        blocks = gram.reshape(b, heads, per_head, heads, per_head)
        blocks = jnp.einsum("bhchd->bhcd", blocks)
        attn = softmax(blocks * self.temperature[None, :, None, None])
        block_diag = jnp.einsum("bhcd,hg->bhcgd", attn, jnp.eye(heads, dtype=attn.dtype))
        v = self._kv(other, slice(c, 2 * c)).reshape(b, h * w, c)
        out = jnp.einsum("bpd,bcd->bpc", v, block_diag.reshape(b, c, c))
        return self.project_out(out.reshape(b, h, w, c))

    def _kv(self, other: jax.Array, channels: slice) -> jax.Array:
        """The k (first C) or v (last C) channels of dw3x3(conv1x1(other)), computed apart so
        that the 2C-wide map never exists: (B, H, W, C) -> (B, H, W, C)."""
        return self.kv_dwconv(self.kv(other, outputs=channels), channels=channels)
