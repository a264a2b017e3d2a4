"""The context-aware transformer block: shifted-window attention plus a local-context branch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgdn_jax.layers import checkpointed, conv

MASK_VALUE = -100.0
LN_EPS = 1e-5
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B * H/w * W/w, w * w, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `window_partition`: (B * nW, w * w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> np.ndarray:
    """(w*w, w*w) index into the ((2w-1)^2, heads) bias table, Swin's convention."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """(nW, w*w, w*w) additive mask for a cyclic shift on an (h, w) map: 0 between tokens of the
    same region before the shift, `MASK_VALUE` otherwise."""
    regions = np.zeros((1, h, w, 1), np.float32)
    label = 0
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in bounds:
        for ws in bounds:
            regions[:, hs, ws, :] = label
            label += 1
    labels = np.asarray(window_partition(regions, window))[..., 0]
    diff = labels[:, None, :] - labels[:, :, None]
    return np.where(diff != 0, MASK_VALUE, 0.0).astype(np.float32)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by its {num_heads} heads")
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nnx.Param(
            _trunc_normal(rngs.params(), ((2 * window - 1) ** 2, num_heads))
        )
        self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=_trunc_normal, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, kernel_init=_trunc_normal, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(B * nW, N, C) windows, optional (nW, N, N) mask -> (B * nW, N, C).

        q, k and v are projected straight into (B * nW, heads, N, d) with the qkv Linear's
        kernel viewed as (C, 3, heads, d), and the output projection contracts (heads, d):
        the same maps as Linear -> reshape -> transpose, without the (3, ...) transposes that
        dominate the backward pass on small windows.
        """
        bw, n, c = x.shape
        heads = self.num_heads
        kernel = self.qkv.kernel[...].astype(x.dtype).reshape(c, 3, heads, c // heads)
        bias = self.qkv.bias[...].astype(x.dtype).reshape(3, heads, 1, c // heads)
        q, k, v = (jnp.einsum("bnc,chd->bhnd", x, kernel[:, i]) + bias[i] for i in range(3))
        logits = jnp.einsum("bhnd,bhmd->bhnm", q * self.scale, k)
        index = relative_position_index(self.window).reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).transpose(2, 0, 1)
        logits = logits + bias[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            logits = logits.reshape(bw, self.num_heads, n, n)
        out = jnp.einsum("bhnm,bhmd->bhnd", jax.nn.softmax(logits, axis=-1), v)
        proj = self.proj.kernel[...].astype(x.dtype).reshape(heads, c // heads, c)
        return jnp.einsum("bhnd,hdo->bno", out, proj) + self.proj.bias[...].astype(x.dtype)


class Mlp(nnx.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=_trunc_normal, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=_trunc_normal, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LocalContext(nnx.Module):
    """Local-context branch: 1x1 (C -> C//8) -> 3x3 -> 1x1 (-> C) -> LReLU(0.2), then channel
    attention (global average pool -> Linear -> ReLU -> Linear -> sigmoid) as a gate."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        hidden = dim // 8
        self.reduce = conv(dim, hidden, 1, rngs=rngs)
        self.spatial = conv(hidden, hidden, 3, rngs=rngs)
        self.expand = conv(hidden, dim, 1, rngs=rngs)
        self.gate_reduce = nnx.Linear(
            dim, hidden, use_bias=False, kernel_init=_trunc_normal, rngs=rngs
        )
        self.gate_expand = nnx.Linear(
            hidden, dim, use_bias=False, kernel_init=_trunc_normal, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        y = jax.nn.leaky_relu(self.expand(self.spatial(self.reduce(x))), 0.2)
        gate = jnp.mean(y, axis=(1, 2), keepdims=True)
        gate = jax.nn.sigmoid(self.gate_expand(jax.nn.relu(self.gate_reduce(gate))))
        return y * gate


class ContextAwareTransformerBlock(nnx.Module):
    """(Shifted-)window attention and MLP with pre-norm residuals, plus the local-context branch
    on the normed input: out = t + attn + mlp + local."""

    def __init__(
        self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, *, rngs: nnx.Rngs
    ):
        self.window = window
        self.shift = shift
        self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.attn = WindowAttention(dim, window, num_heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)
        self.local = LocalContext(dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C); H and W must be multiples of the window."""
        b, h, w, c = x.shape
        u = self.norm1(x)
        shifted = jnp.roll(u, (-self.shift, -self.shift), axis=(1, 2)) if self.shift else u
        mask = (
            jnp.asarray(shift_mask(h, w, self.window, self.shift), u.dtype) if self.shift else None
        )
        attn = self.attn(window_partition(shifted, self.window), mask)
        attn = window_merge(attn, self.window, h, w)
        if self.shift:
            attn = jnp.roll(attn, (self.shift, self.shift), axis=(1, 2))
        t = x + attn
        t = t + self.mlp(self.norm2(t))
        return t + self.local(u)


class TransformerGroup(nnx.Module):
    """`depth` context-aware blocks, shifted by window // 2 on the odd-numbered ones."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, *, rngs: nnx.Rngs
    ):
        self.blocks = nnx.List(
            [
                ContextAwareTransformerBlock(
                    dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, rngs=rngs
                )
                for i in range(depth)
            ]
        )

    def __call__(self, x: jax.Array, remat: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C); `remat` recomputes each block in the backward pass."""
        for block in self.blocks:
            x = checkpointed(block, remat)(x)
        return x
