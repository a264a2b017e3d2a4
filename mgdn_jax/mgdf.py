"""MGDF: the mutual-guided dynamic filter, for two inputs and for three (reference-guided, HDR)."""

from __future__ import annotations

import jax
from flax import nnx

from mgdn_jax.dynamic_filter import KernelPredictor, dynamic_filter
from mgdn_jax.layers import ConvAct, depend_on, lrelu
from mgdn_jax.mgca import MGCA


def _branch_heads(channels: int, rngs: nnx.Rngs) -> tuple[nnx.List, nnx.List]:
    """Two kernel predictors and the two conv1x1 -> LReLU(0.1) projections of filtered maps."""
    predictors = nnx.List([KernelPredictor(channels, rngs=rngs) for _ in range(2)])
    out_convs = nnx.List([ConvAct(channels, channels, 1, lrelu(0.1), rngs=rngs) for _ in range(2)])
    return predictors, out_convs


class MutualMGDF(nnx.Module):
    """Two inputs guide each other: x_1 is filtered with taps predicted from MGCA(x_1, x_2), and
    x_2 with taps from MGCA(x_2, x_1). One MGCA module serves both directions.
    """

    def __init__(self, channels: int, mgca_heads: int, *, rngs: nnx.Rngs):
        self.mgca = MGCA(channels, mgca_heads, rngs=rngs)
        self.predictors, self.out_convs = _branch_heads(channels, rngs)

    def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
        """Two (B, H, W, C) maps -> two filtered (B, H, W, C) maps.

        The second direction starts after the first one's taps (`depend_on`): otherwise
        XLA:CPU interleaves the two MGCA calls, and their six q/k/v maps are alive at once
        (temporaries of a 528x528 pair: 395 instead of 441 MB).
        """
        x1, x2 = xs
        taps1 = self.predictors[0](self.mgca(x1, x2))
        taps2 = self.predictors[1](self.mgca(*depend_on((x2, x1), taps1[0, 0, 0, 0])))
        return [
            self.out_convs[0](dynamic_filter(x1, taps1)),
            self.out_convs[1](dynamic_filter(x2, taps2)),
        ]


class ReferenceMGDF(nnx.Module):
    """Three inputs, the middle one the reference: it guides the filtering of the other two
    (one shared MGCA) and is itself refined by two conv3x3 -> LReLU(0.1) layers, not filtered.
    """

    def __init__(self, channels: int, mgca_heads: int, *, rngs: nnx.Rngs):
        self.mgca = MGCA(channels, mgca_heads, rngs=rngs)
        self.predictors, self.out_convs = _branch_heads(channels, rngs)
        self.ref_refine = nnx.Sequential(
            *(ConvAct(channels, channels, 3, lrelu(0.1), rngs=rngs) for _ in range(2))
        )

    def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
        """Three (B, H, W, C) maps (middle = reference) -> three (B, H, W, C) maps."""
        x1, ref, x3 = xs
        taps1 = self.predictors[0](self.mgca(ref, x1))
        taps3 = self.predictors[1](self.mgca(ref, x3))
        return [
            self.out_convs[0](dynamic_filter(x1, taps1)),
            self.ref_refine(ref),
            self.out_convs[1](dynamic_filter(x3, taps3)),
        ]
