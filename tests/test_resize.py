"""The GDSR bicubic upsampling against PyTorch's."""

import numpy as np
import pytest
import torch

from mgdn_jax.resize import bicubic_resize


@pytest.mark.parametrize("size", [(120, 164), (240, 328), (77, 50)])
def test_matches_torch_bicubic(size):
    x = np.random.default_rng(0).random((30, 41), np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], size=size, mode="bicubic", align_corners=False
    )[0, 0].numpy()
    ours = bicubic_resize(x, size)
    assert ours.shape == size
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_channels_last_and_constant():
    x = np.full((5, 7, 2), 0.25, np.float32)
    np.testing.assert_allclose(bicubic_resize(x, (20, 28)), 0.25, atol=1e-6)
