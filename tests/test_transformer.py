"""Windows, relative positions, the shift mask and the context-aware block against direct
definitions written here independently."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgdn_jax.model import build_model
from mgdn_jax.transformer import (
    MASK_VALUE,
    ContextAwareTransformerBlock,
    TransformerGroup,
    drop_path,
    relative_position_index,
    shift_mask,
    window_merge,
    window_partition,
)
from mgdn_jax.variants import model_config

_erf = np.vectorize(math.erf)


@pytest.mark.parametrize(
    "shape, window", [((2, 8, 12, 5), 4), ((1, 16, 8, 3), 8), ((3, 4, 4, 2), 4)]
)
def test_window_round_trip(shape, window):
    b, h, w, _ = shape
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    windows = window_partition(jnp.asarray(x), window)
    assert windows.shape == (b * (h // window) * (w // window), window * window, shape[-1])
    np.testing.assert_array_equal(window_merge(windows, window, h, w), x)
    # Windows are in row-major order per image, tokens row-major inside a window.
    per_row = w // window
    for n in (0, windows.shape[0] - 1):
        img, rest = divmod(n, (h // window) * per_row)
        wy, wx = divmod(rest, per_row)
        block = x[img, wy * window : (wy + 1) * window, wx * window : (wx + 1) * window]
        np.testing.assert_array_equal(windows[n], block.reshape(window * window, -1))


@pytest.mark.parametrize("window", [1, 2, 4, 7, 8])
def test_relative_position_index(window):
    n = window * window
    expected = np.zeros((n, n), np.int64)
    for a in range(n):
        for b in range(n):
            (ya, xa), (yb, xb) = divmod(a, window), divmod(b, window)
            expected[a, b] = (ya - yb + window - 1) * (2 * window - 1) + (xa - xb + window - 1)
    np.testing.assert_array_equal(relative_position_index(window), expected)


def wrapped(i: int, j: int, h: int, w: int, shift: int) -> tuple[bool, bool]:
    """Whether the pixel at (i, j) of the map cyclically shifted by -shift came around an edge:
    it holds the original pixel ((i + shift) % h, (j + shift) % w)."""
    return i + shift >= h, j + shift >= w


def direct_shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """-100 between two tokens of a shifted window that were not neighbours before the shift."""
    n = window * window
    masks = []
    for wy in range(h // window):
        for wx in range(w // window):
            pos = [(wy * window + a // window, wx * window + a % window) for a in range(n)]
            labels = [wrapped(i, j, h, w, shift) for i, j in pos]
            masks.append([[0.0 if la == lb else MASK_VALUE for lb in labels] for la in labels])
    return np.asarray(masks, np.float32)


@pytest.mark.parametrize(
    "h, w, window, shift",
    [(8, 12, 4, 2), (12, 8, 4, 2), (4, 8, 4, 2), (16, 24, 8, 4), (8, 8, 4, 1)],
)
def test_shift_mask(h, w, window, shift):
    mask = shift_mask(h, w, window, shift)
    assert mask.shape == ((h // window) * (w // window), window * window, window * window)
    np.testing.assert_array_equal(mask, direct_shift_mask(h, w, window, shift))


def test_group_shifts_odd_blocks():
    group = nnx.eval_shape(lambda: TransformerGroup(16, 5, 2, 8, 2.0, rngs=nnx.Rngs(0)))
    assert [block.attn.shift for block in group.blocks] == [0, 4, 0, 4, 0]


def test_drop_path_zeroes_or_rescales_whole_samples():
    x = jnp.asarray(np.random.default_rng(0).random((4000, 2, 3, 2)), jnp.float32)
    y = np.asarray(drop_path(x, 0.25, jax.random.PRNGKey(1)))
    kept = np.all(np.isclose(y, np.asarray(x) / 0.75, rtol=1e-6), axis=(1, 2, 3))
    dropped = np.all(y == 0, axis=(1, 2, 3))
    assert np.all(kept | dropped)
    assert abs(kept.mean() - 0.75) < 0.03
    assert drop_path(x, 0.25, None) is x and drop_path(x, 0.0, jax.random.PRNGKey(1)) is x


def test_stochastic_depth_rises_over_all_blocks_and_trains_only():
    """The release's rates: linspace(0, drop_path_rate, sum(depths)) over the blocks of all
    stages in order; inference (no key) is deterministic, a key draws the drops."""
    mef = nnx.eval_shape(lambda: build_model(model_config("mef")))
    rates = [b.drop_path_rate for stage in mef.stages for b in stage.transformer.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 12))
    cfg = model_config("mff")
    cfg.update(embed_dim=12, depths=(2, 2), num_heads=(2, 2), drop_path_rate=0.9)
    model = build_model(cfg)
    rng = np.random.default_rng(2)
    a, b = (jnp.asarray(rng.random((8, 16, 16, 3)), jnp.float32) for _ in range(2))
    plain = np.asarray(model(a, b))
    np.testing.assert_array_equal(np.asarray(model(a, b, dropout_key=None)), plain)
    drawn = np.asarray(model(a, b, dropout_key=jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(np.asarray(model(a, b, dropout_key=jax.random.PRNGKey(3))), drawn)
    assert not np.array_equal(drawn, plain)


def random_block(dim, heads, window, shift, mlp_ratio, rng) -> ContextAwareTransformerBlock:
    """A block with every parameter drawn at random (no initialiser to compile)."""
    block = nnx.eval_shape(
        lambda: ContextAwareTransformerBlock(dim, heads, window, shift, mlp_ratio, rngs=nnx.Rngs(0))
    )
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        value = 0.3 * rng.standard_normal(var.shape)
        if path[-1] == "scale":
            value += 1.0
        elif path[-1] == "relative_position_bias_table":
            value /= 0.3
        var.set_value(jnp.asarray(value, jnp.float32))
    return block


def numpy_block(block: ContextAwareTransformerBlock, x: np.ndarray, heads: int) -> np.ndarray:
    """The block in float64, attention computed window by window on the original pixel grid."""

    def p(path: str) -> np.ndarray:
        module = block
        for name in path.split(".")[:-1]:
            module = getattr(module, name)
        return np.asarray(getattr(module, path.split(".")[-1]).get_value(), np.float64)

    def layer_norm(t, name):
        mean = t.mean(-1, keepdims=True)
        var = ((t - mean) ** 2).mean(-1, keepdims=True)
        return (t - mean) / np.sqrt(var + 1e-5) * p(f"{name}.scale") + p(f"{name}.bias")

    def linear(t, name, bias=True):
        return t @ p(f"{name}.kernel") + (p(f"{name}.bias") if bias else 0.0)

    def conv(t, name):
        kernel = p(f"{name}.kernel")
        k = kernel.shape[0]
        _, hh, ww, _ = t.shape
        tpad = np.pad(t, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
        out = sum(
            tpad[:, dy : dy + hh, dx : dx + ww] @ kernel[dy, dx]
            for dy in range(k)
            for dx in range(k)
        )
        return out + p(f"{name}.bias")

    window, shift = block.attn.window, block.attn.shift
    b, h, w, c = x.shape
    d = c // heads
    x = x.astype(np.float64)
    u = layer_norm(x, "norm1")
    qkv = linear(u, "attn.qkv").reshape(b, h, w, 3, heads, d)
    table = p("attn.relative_position_bias_table")
    attn = np.zeros((b, h, w, c))
    for wy in range(h // window):
        for wx in range(w // window):
            # Token a of this shifted window sits at (i, j) of the shifted map and holds the
            # original pixel ((i + shift) % h, (j + shift) % w); the output goes back there.
            cells = [
                (wy * window + a // window, wx * window + a % window) for a in range(window**2)
            ]
            rows = np.array([(i + shift) % h for i, _ in cells])
            cols = np.array([(j + shift) % w for _, j in cells])
            q, k, v = (qkv[:, rows, cols, s] for s in range(3))  # (B, N, heads, d)
            logits = np.einsum("bnhd,bmhd->bhnm", q * d**-0.5, k)
            for na, (ia, ja) in enumerate(cells):
                for nb, (ib, jb) in enumerate(cells):
                    rel = (ia - ib + window - 1) * (2 * window - 1) + (ja - jb + window - 1)
                    logits[:, :, na, nb] += table[rel]
                    if shift and wrapped(ia, ja, h, w, shift) != wrapped(ib, jb, h, w, shift):
                        logits[:, :, na, nb] += MASK_VALUE
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out = np.einsum("bhnm,bmhd->bnhd", weights, v).reshape(b, -1, c)
            attn[:, rows, cols] = linear(out, "attn.proj")
    t = x + attn
    hidden = linear(layer_norm(t, "norm2"), "mlp.fc1")
    t = t + linear(0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0))), "mlp.fc2")
    y = conv(conv(conv(u, "local.reduce"), "local.spatial"), "local.expand")
    y = np.where(y >= 0, y, 0.2 * y)
    gate = np.maximum(linear(y.mean((1, 2)), "local.gate_reduce", bias=False), 0.0)
    gate = linear(gate, "local.gate_expand", bias=False)
    return t + y * (1.0 / (1.0 + np.exp(-gate)))[:, None, None, :]


@pytest.mark.parametrize("h, w, window, shift", [(8, 12, 4, 2), (8, 12, 4, 0), (8, 16, 8, 4)])
def test_block_matches_direct_definition(h, w, window, shift):
    rng = np.random.default_rng(0)
    dim, heads = 16, 2
    block = random_block(dim, heads, window, shift, 2.0, rng)
    x = rng.standard_normal((2, h, w, dim)).astype(np.float32)
    expected = numpy_block(block, x, heads)
    np.testing.assert_allclose(block(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)
