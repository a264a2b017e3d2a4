"""The whole MGDN network: embedding, fusion stages, reconstruction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mgdn_jax.errors import UserError
from mgdn_jax.layers import ConvAct, checkpointed, conv, lrelu
from mgdn_jax.mgdf import MutualMGDF, ReferenceMGDF
from mgdn_jax.transformer import TransformerGroup

# Index of the input whose embedding is added back before the last conv.
_SKIP_INPUT = {"fusion": 0, "gdsr": 1, "hdr": 1}


def check_reflect_pad(h: int, w: int, multiple: int) -> None:
    """Reflect padding to a multiple of `multiple` needs each pad to be shorter than its side."""
    if -h % multiple >= h or -w % multiple >= w:
        raise UserError(f"image of {h}x{w} is too small to reflect-pad to a multiple of {multiple}")


def pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
    """Reflect-pads (B, H, W, C) at the bottom/right so that H and W are multiples of `multiple`."""
    _, h, w, _ = x.shape
    check_reflect_pad(h, w, multiple)
    return jnp.pad(x, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)), mode="reflect")


class FusionStage(nnx.Module):
    """MGDF -> 1x1 merge -> context-aware transformer blocks -> dilated conv, then one 1x1
    conv per input on concat(context, filtered input)."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        stage: int,
        drop_path_rates: tuple[float, ...],
        *,
        rngs: nnx.Rngs,
    ):
        c, n = cfg.embed_dim, len(cfg.in_channels)
        mgdf = ReferenceMGDF if cfg.task == "hdr" else MutualMGDF
        self.mgdf = mgdf(c, cfg.mgca_heads, rngs=rngs)
        self.merge = conv(n * c, c, 1, rngs=rngs)
        self.transformer = TransformerGroup(
            c,
            cfg.depths[stage],
            cfg.num_heads[stage],
            cfg.window_size,
            cfg.mlp_ratio,
            drop_path_rates,
            rngs=rngs,
        )
        self.dilated_conv = conv(c, c, 3, dilation=2, rngs=rngs)
        self.out_convs = nnx.List([conv(2 * c, c, 1, rngs=rngs) for _ in range(n)])

    def __call__(
        self,
        xs: list[jax.Array],
        filtered: list[jax.Array] | None = None,
        remat: bool = False,
        key: jax.Array | None = None,
    ) -> list[jax.Array]:
        """n (B, H, W, C) maps -> n (B, H, W, C) maps. `filtered`, if given, is `self.mgdf(xs)`
        computed by the caller (who also needs it); `remat` recomputes the MGDF and every
        transformer block in the backward pass; `key` (training) draws stochastic depth."""
        if filtered is None:
            filtered = checkpointed(self.mgdf, remat)(xs)
        x = self.merge(filtered)
        context = self.dilated_conv(self.transformer(x, remat, key))
        return [out([context, f]) for out, f in zip(self.out_convs, filtered)]


class MGDN(nnx.Module):
    """Mutual-Guided Dynamic Network.

    Inputs are NHWC float arrays of one (B, H, W) size: MFF/MEF two (B, H, W, 3) images; HDR
    three (B, H, W, 6) frames (LDR || LDR^gamma / t), the middle one the reference; GDSR an RGB
    (B, H, W, 3) image and an upsampled (B, H, W, 1) depth map. Output: (B, H, W, out) in [0, 1].
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        c = cfg.embed_dim
        self.variant = cfg.variant
        self.in_channels = tuple(cfg.in_channels)
        self.window_size = cfg.window_size
        self.skip_input = _SKIP_INPUT[cfg.task]
        self.num_inputs = len(self.in_channels)
        if cfg.task == "hdr":
            self.embed = nnx.List([conv(cfg.in_channels[0], c, 3, rngs=rngs)])
        else:
            self.embed = nnx.List([conv(ch, c, 3, rngs=rngs) for ch in cfg.in_channels])
        # Stochastic depth rising linearly over all blocks, 0 to drop_path_rate, as in SwinIR
        # and the release (exports written before the field existed: none, for inference).
        rates = np.linspace(0.0, cfg.get("drop_path_rate", 0.0), sum(cfg.depths)).tolist()
        ends = np.cumsum((0, *cfg.depths))
        self.stages = nnx.List(
            [
                FusionStage(cfg, i, tuple(rates[ends[i] : ends[i + 1]]), rngs=rngs)
                for i in range(len(cfg.depths))
            ]
        )
        self.merge = ConvAct(self.num_inputs * c, c, 3, lrelu(0.2), rngs=rngs)
        self.head = ConvAct(c, cfg.out_channels, 3, jax.nn.sigmoid, rngs=rngs)

    def _embed(self, i: int, x: jax.Array) -> jax.Array:
        return self.embed[i % len(self.embed)](x)

    def __call__(
        self,
        *inputs: jax.Array,
        return_features: bool = False,
        remat: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, list[list[jax.Array]]]:
        """Fuses the inputs; with `return_features`, also returns the MGDF-filtered maps of every
        stage: features[stage][input] is (B, Hp, Wp, C) at the window-padded size Hp x Wp.

        remat: under differentiation, keep only the inputs of every MGDF and transformer block
        and recompute their activations in the backward pass (less memory, about a third more
        work).
        dropout_key: training only: draws the transformer blocks' stochastic depth (rates
        linear in depth up to the config's drop_path_rate); None, as in inference: none.
        """
        if len(inputs) != self.num_inputs:
            raise ValueError(
                f"variant {self.variant!r} takes {self.num_inputs} inputs, got {len(inputs)}"
            )
        h, w = inputs[0].shape[1:3]
        for i, (x, ch) in enumerate(zip(inputs, self.in_channels)):
            if x.ndim != 4 or x.shape[1:3] != (h, w) or x.shape[-1] != ch:
                raise ValueError(
                    f"input {i} has shape {tuple(x.shape)}; variant {self.variant!r} expects "
                    f"(B, {h}, {w}, {ch})"
                )
        feats = [self._embed(i, pad_to_multiple(x, self.window_size)) for i, x in enumerate(inputs)]
        skip = feats[self.skip_input]
        filtered = []
        keys = (
            [None] * len(self.stages)
            if dropout_key is None
            else jax.random.split(dropout_key, len(self.stages))
        )
        for stage, key in zip(self.stages, keys):
            filtered.append(checkpointed(stage.mgdf, remat)(feats))
            feats = stage(feats, filtered[-1], remat, key)
        x = self.merge(jnp.concatenate(feats, axis=-1)) + skip
        out = self.head(x)[:, :h, :w, :]
        return (out, filtered) if return_features else out


def build_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> MGDN:
    """Builds a randomly initialised MGDN from a model ConfigDict (see `mgdn_jax.variants`).

    Keys use the 'rbg' generator: each distinct parameter shape compiles its own sampler, and
    threefry's take far longer to compile on CPU.
    """
    return MGDN(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


def abstract_model(cfg: ml_collections.ConfigDict) -> MGDN:
    """An MGDN whose parameters are shape-only placeholders, to be filled from a checkpoint."""
    return nnx.eval_shape(lambda: MGDN(cfg, rngs=nnx.Rngs(0)))
