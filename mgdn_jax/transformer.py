"""The context-aware transformer block: shifted-window attention plus a local-context branch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgdn_jax.layers import (
    checkpointed,
    conv,
    depend_on,
    kernel_gradient,
    leaky_relu,
    recomputed,
    softmax,
    softmax_grad,
    tied,
)

MASK_VALUE = -100.0
LN_EPS = 1e-5
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """LayerNorm over the last axis as PyTorch computes it (biased variance, eps `LN_EPS`):
    (..., C), (C,), (C,) -> (..., C) in x's dtype, statistics in float32 (float64 for float64 x).

    The backward pass is written out and keeps only x and the (..., 1) mean and inverse
    deviation: differentiating the forward would keep four (..., C) intermediates per norm.
    """
    return _layer_norm_fwd(x, scale, bias)[0]


def _normalise(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x - mean) / sqrt(var + eps) in float32 (float64 for float64 x), with the (..., 1) mean
    and 1 / sqrt(var + eps)."""
    x = x.astype(_acc(x.dtype))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + LN_EPS)
    return centred * rstd, mean, rstd


def _acc(dtype: jnp.dtype) -> jnp.dtype:
    """The accumulation dtype for `dtype`: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _affine(xhat: jax.Array, scale: jax.Array, bias: jax.Array, dtype: jnp.dtype) -> jax.Array:
    acc = xhat.dtype
    return (xhat * scale.astype(acc) + bias.astype(acc)).astype(dtype)


def _layer_norm_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array) -> tuple[jax.Array, tuple]:
    xhat, mean, rstd = _normalise(x)
    return _affine(xhat, scale, bias, x.dtype), (x, mean, rstd, scale)


def _sum_rows(a: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """(..., C) -> (C,) sum over every other axis, accumulated in float32 or wider."""
    return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0, dtype=_acc(a.dtype)).astype(dtype)


def _normalise_with(x: jax.Array, mean: jax.Array, rstd: jax.Array) -> jax.Array:
    """The normalised input (x - mean) * rstd from the kept statistics, in their dtype."""
    return (x.astype(mean.dtype) - mean) * rstd


def _layer_norm_grads(
    xhat: jax.Array, rstd: jax.Array, scale: jax.Array, g: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """d x (in `dtype`), d scale, d bias of `layer_norm` for the output cotangent g, from the
    normalised input xhat (`_normalise_with`)."""
    acc = xhat.dtype
    g = g.astype(acc)
    gx = g * scale.astype(acc)
    dx = rstd * (
        gx
        - jnp.mean(gx, axis=-1, keepdims=True)
        - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True)
    )
    return dx.astype(dtype), _sum_rows(g * xhat, scale.dtype), _sum_rows(g, scale.dtype)


def _layer_norm_bwd(residuals: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, mean, rstd, scale = recomputed(g, *residuals)
    return _layer_norm_grads(_normalise_with(x, mean, rstd), rstd, scale, g, x.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """`layer_norm` with learned scale (init 1) and bias (init 0), named as `nnx.LayerNorm`
    names them."""

    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., C) -> (..., C)."""
        return tied(self, LayerNorm._normalised)(x)

    def _normalised(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...])


_SQRT_HALF = 0.5**0.5
_INV_SQRT_2PI = (2 * np.pi) ** -0.5


def _gelu_parts(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact GELU of h and its derivative, in float32 or wider: (h * Phi(h), Phi(h) + h phi(h)),
    Phi(h) = (1 + erf(h / sqrt(2))) / 2 as PyTorch computes it. (`jax.nn.gelu` uses erfc,
    which XLA:CPU evaluates 2.4x slower than erf.)"""
    h = h.astype(_acc(h.dtype))
    cdf = 0.5 + 0.5 * jax.lax.erf(h * _SQRT_HALF)
    pdf = jnp.exp(-0.5 * jnp.square(h)) * _INV_SQRT_2PI
    return h * cdf, cdf + h * pdf


# (norm scale, norm bias, w1, b1, w2, b2) of `norm_mlp`.
MlpParams = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


@jax.custom_vjp
def norm_mlp(t: jax.Array, params: MlpParams) -> jax.Array:
    """The pre-norm MLP branch, Linear -> exact (erf) GELU -> Linear on `layer_norm(t)`:
    (..., C) -> (..., C); params = (scale (C,), bias (C,), w1 (C, hidden), b1 (hidden,),
    w2 (hidden, C), b2 (C,)).

    The backward pass keeps only t and its norm statistics and recomputes the normed input
    and the hidden layer (one C x hidden matmul): differentiating the forward would keep the
    normed input, the hidden pre-activation, the GELU's output and three of its
    intermediates, five of them of the hidden width.
    """
    return _norm_mlp_fwd(t, params)[0]


def _norm_mlp_fwd(t: jax.Array, params: MlpParams) -> tuple[jax.Array, tuple]:
    scale, bias, w1, b1, w2, b2 = params
    x, (_, mean, rstd, _) = _layer_norm_fwd(t, scale, bias)
    h = x @ w1 + b1
    y = _gelu_parts(h)[0].astype(h.dtype) @ w2 + b2
    return y, (t, mean, rstd, params)


def _norm_mlp_bwd(residuals: tuple, g: jax.Array) -> tuple[jax.Array, MlpParams]:
    t, mean, rstd, params = recomputed(g, *residuals)
    scale, bias, w1, b1, w2, b2 = params
    xhat = _normalise_with(t, mean, rstd)
    x = _affine(xhat, scale, bias, t.dtype)
    h = x @ w1 + b1
    activation, slope = _gelu_parts(h)
    dh = ((g @ w2.T).astype(slope.dtype) * slope).astype(h.dtype)
    dw2 = kernel_gradient(activation.astype(h.dtype), g)
    dw1 = kernel_gradient(x, dh)
    dt, dscale, dbias = _layer_norm_grads(xhat, rstd, scale, dh @ w1.T, t.dtype)
    return dt, (dscale, dbias, dw1, _sum_rows(dh, b1.dtype), dw2, _sum_rows(g, b2.dtype))


norm_mlp.defvjp(_norm_mlp_fwd, _norm_mlp_bwd)


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


def shift_regions(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """(nW, w*w) int32 label of each window token's region before a cyclic shift by `shift` on
    an (h, w) map (Swin's nine regions)."""
    regions = np.zeros((1, h, w, 1), np.int32)
    label = 0
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in bounds:
        for ws in bounds:
            regions[:, hs, ws, :] = label
            label += 1
    return np.asarray(window_partition(regions, window))[..., 0]


def region_mask(labels: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """(nW, N) region labels -> (nW, N, N) additive mask: 0 between tokens of the same region,
    `MASK_VALUE` otherwise."""
    return jnp.where(labels[:, :, None] != labels[:, None, :], MASK_VALUE, 0.0).astype(dtype)


def shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """(nW, w*w, w*w) additive mask for a cyclic shift on an (h, w) map (`region_mask` of
    `shift_regions`)."""
    return np.asarray(region_mask(shift_regions(h, w, window, shift), jnp.float32))


@jax.custom_vjp
def project_heads(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Per-head projection of tokens: (B, N, C) x, (C, heads, d) kernel, (heads, d) bias ->
    (B, heads, N, d), x @ kernel + bias.

    The forward pass is one token-major (B N, C) x (C, heads d) matmul whose output is
    transposed to heads-major; for the einsum straight into (B, heads, N, d), XLA:CPU makes a
    strided channels-first copy of x instead, and the window attention's forward pass is about
    20 % slower (528², window 4, C = 30). The backward pass is the two contractions with the
    heads-major cotangent (what differentiating that einsum gives), which run faster than the
    transposes that differentiating the token-major forward pass would add.
    """
    b, n, c = x.shape
    heads, d = bias.shape
    y = x @ kernel.reshape(c, heads * d) + bias.reshape(heads * d)
    return y.reshape(b, n, heads, d).transpose(0, 2, 1, 3)


def _project_heads_fwd(
    x: jax.Array, kernel: jax.Array, bias: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return project_heads(x, kernel, bias), (x, kernel)


def _project_heads_bwd(
    residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, kernel = residuals
    dx = jnp.einsum("bhnd,chd->bnc", g, kernel)
    dkernel = jnp.einsum("bnc,bhnd->chd", x, g)
    return dx, dkernel, jnp.sum(g, axis=(0, 2), dtype=_acc(g.dtype)).astype(g.dtype)


project_heads.defvjp(_project_heads_fwd, _project_heads_bwd)


def _logits(q: jax.Array, k: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    """(B nW, heads, N, N) q k^T + bias + mask (`attend`'s arguments)."""
    bw, heads, n, _ = q.shape
    nw = mask.shape[0]
    logits = jnp.einsum("bhnd,bhmd->bhnm", q, k) + bias
    return (logits.reshape(bw // nw, nw, heads, n, n) + mask[None, :, None]).reshape(logits.shape)


@jax.custom_vjp
def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T + bias + mask) v in every window and head: (B nW, heads, N, d) q, k, v,
    (heads, N, N) bias, (nW or 1, N, N) mask (not differentiated) -> (B nW, heads, N, d).

    The backward pass recomputes the attention probabilities twice, as (N, N) and transposed
    as (M, N) from k q^T, so that each of d q, d k and d v is a plain batched matmul
    ((N, M) x (M, d)). Differentiating the forward pass contracts the probabilities' leading
    token axis for d k and d v instead, which XLA:CPU hands to a generic batched dot that runs
    16 x 16 windows at about 1 GFLOP/s.
    """
    return jnp.einsum("bhnm,bhmd->bhnd", softmax(_logits(q, k, bias, mask)), v)


def _attend_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array
) -> tuple[jax.Array, tuple]:
    return attend(q, k, v, bias, mask), (q, k, v, bias, mask)


def _attend_bwd(residuals: tuple, g: jax.Array) -> tuple:
    q, k, v, bias, mask = residuals
    p = jax.nn.softmax(_logits(q, k, bias, mask), axis=-1)
    dlogits = softmax_grad(p, jnp.einsum("bhnd,bhmd->bhnm", g, v), -1)
    dq = jnp.einsum("bhnm,bhmd->bhnd", dlogits, k)
    transposed = _logits(k, q, bias.swapaxes(-1, -2), mask.swapaxes(-1, -2))
    pt = jax.nn.softmax(transposed, axis=-2)
    dlogits_t = softmax_grad(pt, jnp.einsum("bhmd,bhnd->bhmn", v, g), -2)
    dk = jnp.einsum("bhmn,bhnd->bhmd", dlogits_t, q)
    dv = jnp.einsum("bhmn,bhnd->bhmd", pt, g)
    dbias = jnp.sum(dlogits, axis=0, dtype=_acc(g.dtype)).astype(bias.dtype)
    return dq, dk, dv, dbias, jnp.zeros_like(mask)


attend.defvjp(_attend_fwd, _attend_bwd)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside the (shifted) windows of a map, with a learned relative
    position bias and, when shifted, Swin's mask."""

    def __init__(self, dim: int, window: int, num_heads: int, shift: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by its {num_heads} heads")
        self.window = window
        self.shift = shift
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nnx.Param(
            _trunc_normal(rngs.params(), ((2 * window - 1) ** 2, num_heads))
        )
        self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=_trunc_normal, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, kernel_init=_trunc_normal, rngs=rngs)

    def on_map(self, u: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C): cyclic shift by -shift, attention in windows, shift
        back. The block keeps what its backward pass needs (q, k and v, which `attend` turns
        back into probabilities, and the projections' inputs): recomputing it all from u
        instead saves about 260 MB of the MFF training step's temporaries (4 x 128^2) and costs
        10-15 % of its time; the model's `remat` switch does that for the whole block."""
        _, h, w, _ = u.shape
        s = self.shift
        mask = None
        if s:
            u = jnp.roll(u, (-s, -s), axis=(1, 2))
            # Built after this block's input (a 0/1 scalar of it, so labels stay finite): a
            # mask shared by the shifted blocks would stay alive in between (18 MB at 528^2).
            labels = jnp.asarray(shift_regions(h, w, self.window, s), jnp.float32)
            mask = region_mask(depend_on(labels, jnp.isnan(u[0, 0, 0, 0])), u.dtype)
        out = window_merge(self(window_partition(u, self.window), mask), self.window, h, w)
        return jnp.roll(out, (s, s), axis=(1, 2)) if s else out

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(B * nW, N, C) windows, optional (nW, N, N) mask -> (B * nW, N, C).

        q, k and v are projected apart into (B * nW, heads, N, d) (`project_heads`, the qkv
        Linear's kernel viewed as (C, 3, heads, d)), attended by `attend`, and the output
        projection contracts (heads, d): the same maps as Linear -> reshape -> transpose,
        without the (3, ...) transposes that dominate the backward pass on small windows.
        """
        _, n, c = x.shape
        heads = self.num_heads
        kernel = self.qkv.kernel[...].astype(x.dtype).reshape(c, 3, heads, c // heads)
        bias = self.qkv.bias[...].astype(x.dtype).reshape(3, heads, c // heads)
        q, k, v = (project_heads(x, kernel[:, i], bias[i]) for i in range(3))
        index = relative_position_index(self.window).reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).transpose(2, 0, 1)
        if mask is None:
            mask = jnp.zeros((1, n, n), x.dtype)
        out = attend(q * self.scale, k, v, bias.astype(x.dtype), mask)
        proj = self.proj.kernel[...].astype(x.dtype).reshape(heads, c // heads, c)
        return jnp.einsum("bhnd,hdo->bno", out, proj) + self.proj.bias[...].astype(x.dtype)


class Mlp(nnx.Module):
    """Linear -> exact GELU -> Linear, applied to a LayerNorm of its input (`norm_mlp`)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=_trunc_normal, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=_trunc_normal, rngs=rngs)

    def __call__(self, t: jax.Array, norm_scale: jax.Array, norm_bias: jax.Array) -> jax.Array:
        """(..., C) t and the (C,) scale and bias of the norm before the MLP -> (..., C)."""
        return tied(self, Mlp._forward)(t, norm_scale, norm_bias)

    def _forward(self, t: jax.Array, norm_scale: jax.Array, norm_bias: jax.Array) -> jax.Array:
        linears = (self.fc1.kernel, self.fc1.bias, self.fc2.kernel, self.fc2.bias)
        params = (norm_scale, norm_bias, *(p[...].astype(t.dtype) for p in linears))
        return norm_mlp(t, params)


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
        """(B, H, W, C) -> (B, H, W, C); recomputed in the backward pass from x
        (`tied(remat=True)`): its C//8-wide convolutions are cheap, its C-wide activation is
        not worth keeping."""
        return tied(self, LocalContext._branch, remat=True)(x)

    def _branch(self, x: jax.Array) -> jax.Array:
        y = leaky_relu(self.expand(self.spatial(self.reduce(x))), 0.2)
        gate = jnp.mean(y, axis=(1, 2), keepdims=True)
        gate = jax.nn.sigmoid(self.gate_expand(jax.nn.relu(self.gate_reduce(gate))))
        return y * gate


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth, as timm's DropPath trains: with `key`, each sample of x (B, ...) is
    zeroed with probability `rate` and otherwise scaled by 1 / (1 - rate); without, x."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask / keep).astype(x.dtype)


class ContextAwareTransformerBlock(nnx.Module):
    """(Shifted-)window attention and MLP with pre-norm residuals, plus the local-context branch
    on the normed input: out = t + attn + mlp + local. In training (a `key`), the attention and
    MLP branches each go through `drop_path` at rate `drop_path_rate`, independently."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_path_rate: float = 0.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, shift, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)
        self.local = LocalContext(dim, rngs=rngs)
        self.drop_path_rate = drop_path_rate

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C); H and W must be multiples of the window."""
        attn_key, mlp_key = (None, None) if key is None else tuple(jax.random.split(key))
        u = self.norm1(x)
        attn = tied(self.attn, WindowAttention.on_map)(u)
        t = x + drop_path(attn, self.drop_path_rate, attn_key)
        mlp = self.mlp(t, self.norm2.scale[...], self.norm2.bias[...])
        t = t + drop_path(mlp, self.drop_path_rate, mlp_key)
        return t + self.local(u)


class TransformerGroup(nnx.Module):
    """`depth` context-aware blocks, shifted by window // 2 on the odd-numbered ones, block i
    with stochastic depth `drop_path_rates[i]`."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path_rates: tuple[float, ...] | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        rates = drop_path_rates or (0.0,) * depth
        self.blocks = nnx.List(
            [
                ContextAwareTransformerBlock(
                    dim,
                    num_heads,
                    window,
                    0 if i % 2 == 0 else window // 2,
                    mlp_ratio,
                    rates[i],
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )

    def __call__(
        self, x: jax.Array, remat: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C); `remat` recomputes each block in the backward pass;
        `key` (training) draws the blocks' stochastic depth."""
        keys = [None] * len(self.blocks) if key is None else jax.random.split(key, len(self.blocks))
        for block, block_key in zip(self.blocks, keys):
            x = checkpointed(block, remat)(x, key=block_key)
        return x
