"""The released MGDN architectures, as model ConfigDicts, and the release's input conventions.

These are the hyper-parameters of the official release; `configs/<task>.py` embed them, and
`mgdn_jax.convert` uses them to build a model for a given checkpoint variant.
"""

from __future__ import annotations

import ml_collections
import numpy as np

VARIANTS = ("mff", "mef", "hdr", "gdsr", "gdsr16")

# The release's GDSR data loaders standardise the RGB guide (in [0, 1]) with ImageNet's channel
# statistics before it reaches the network.
GDSR_RGB_MEAN = (0.485, 0.456, 0.406)
GDSR_RGB_STD = (0.229, 0.224, 0.225)


def gdsr_normalised_depth(depth: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(H, W) depth -> (float32 (depth - min) / (max - min), min, max), as the release
    normalises GDSR depth maps (all 0 for a flat map)."""
    low, high = float(depth.min()), float(depth.max())
    return ((depth - low) / (high - low if high > low else 1.0)).astype(np.float32), low, high


def gdsr_rgb(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> the GDSR network's RGB input: (rgb - mean) / std, float32."""
    mean = np.asarray(GDSR_RGB_MEAN, np.float32)
    std = np.asarray(GDSR_RGB_STD, np.float32)
    return ((np.asarray(rgb, np.float32) - mean) / std).astype(np.float32)


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The released architecture of `variant` (one of `VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    cfg = ml_collections.ConfigDict()
    cfg.variant = variant
    cfg.mgca_heads = 6
    # The release's constructors' default, used in training only (stochastic depth).
    cfg.drop_path_rate = 0.1
    if variant == "mff":
        cfg.update(
            task="fusion",
            embed_dim=30,
            depths=(3, 3),
            num_heads=(3, 3),
            window_size=4,
            mlp_ratio=2.0,
            in_channels=(3, 3),
            out_channels=3,
        )
    elif variant == "mef":
        cfg.update(
            task="fusion",
            embed_dim=60,
            depths=(6, 6),
            num_heads=(6, 6),
            window_size=8,
            mlp_ratio=2.0,
            in_channels=(3, 3),
            out_channels=3,
        )
    elif variant == "hdr":
        cfg.update(
            task="hdr",
            embed_dim=60,
            depths=(6, 6, 6),
            num_heads=(6, 6, 6),
            window_size=8,
            mlp_ratio=4.0,
            in_channels=(6, 6, 6),
            out_channels=3,
        )
    else:
        cfg.update(
            task="gdsr",
            embed_dim=60 if variant == "gdsr16" else 30,
            depths=(3, 3, 3),
            num_heads=(6, 6, 6),
            window_size=4,
            mlp_ratio=4.0,
            in_channels=(3, 1),
            out_channels=1,
        )
    return cfg
