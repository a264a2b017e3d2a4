"""Bicubic resizing that matches PyTorch's `F.interpolate(mode='bicubic', align_corners=False)`.

PyTorch uses the Keys cubic kernel with a = -0.75 and clamps source indices at the border;
`jax.image.resize` uses a = -0.5, so GDSR inputs need this explicit version.
"""

from __future__ import annotations

import numpy as np

TORCH_CUBIC_A = -0.75


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int, a: float = TORCH_CUBIC_A) -> np.ndarray:
    """(size_out, size_in) matrix of PyTorch's bicubic interpolation along one axis."""
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(src)
    frac = src - base
    matrix = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    for offset in (-1, 0, 1, 2):
        index = np.clip(base + offset, 0, size_in - 1).astype(np.int64)
        np.add.at(matrix, (rows, index), _cubic(frac - offset, a))
    return matrix


def bicubic_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes (H, W) or (H, W, C) to `size` = (H', W') as PyTorch bicubic (float64 inside)."""
    rows = bicubic_matrix(image.shape[0], size[0])
    cols = bicubic_matrix(image.shape[1], size[1])
    out = np.einsum("ih,hw...,jw->ij...", rows, image.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)
