"""Activation recording from PyTorch modules (`mgdn_jax.torch_hooks`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mgdn_jax.parity import read_activations
from mgdn_jax.torch_hooks import record_activations

nn = torch.nn


class Split(nn.Module):
    """(B, 4, H, W) -> [(B, 2, H, W), (B, 2, H, W)]."""

    def forward(self, x):
        return [x[:, :2], x[:, 2:]]


class Tiny(nn.Module):
    """A conv and an activation used twice, a list-returning module and a Linear on tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.split = Split()
        self.proj = nn.Linear(2, 5)

    def forward(self, a, b):
        x = self.act(self.conv(a)) + self.act(self.conv(b))
        p, q = self.split(x)
        tokens = self.proj(p.flatten(2).transpose(1, 2))  # (B, H*W, 5)
        gate = tokens.sum(-1).reshape(q.shape[0], 1, *q.shape[2:])
        return q * gate


def nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture
def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture
def inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 5, 7, 3), dtype=np.float32) for _ in range(2)]


def test_keys_layouts_and_repeated_calls(tiny, inputs, tmp_path):
    path = tmp_path / "acts.npz"
    arrays = record_activations(tiny, inputs, path)
    assert set(arrays) == {
        "input0",
        "input1",
        "output",
        "act/conv",
        "act/conv#1",
        "act/act",
        "act/act#1",
        "act/split[0]",
        "act/split[1]",
        "act/proj",
    }
    a, b = inputs
    with torch.no_grad():
        conv_a, conv_b = tiny.conv(nchw(a)), tiny.conv(nchw(b))
        x = tiny.act(conv_a) + tiny.act(conv_b)
        tokens = tiny.proj(x[:, :2].flatten(2).transpose(1, 2))
        output = tiny(nchw(a), nchw(b))
    np.testing.assert_array_equal(arrays["input0"], a)
    np.testing.assert_array_equal(arrays["input1"], b)
    assert arrays["act/conv"].shape == (2, 5, 7, 4)
    np.testing.assert_allclose(arrays["act/conv"], nhwc(conv_a), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["act/conv#1"], nhwc(conv_b), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["act/act#1"], nhwc(tiny.act(conv_b)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["act/split[0]"], nhwc(x[:, :2]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["act/split[1]"], nhwc(x[:, 2:]), rtol=1e-6, atol=1e-6)
    assert arrays["act/proj"].shape == (2, 35, 5)  # tokens keep their layout
    np.testing.assert_allclose(arrays["act/proj"], tokens.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["output"], nhwc(output), rtol=1e-6, atol=1e-6)

    on_disk = read_activations(path)
    assert set(on_disk) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(on_disk[key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["acts.npz"]  # no temporary file left
    assert all(not m._forward_hooks for m in tiny.modules())  # hooks removed


def test_include_selects_modules(tiny, inputs):
    arrays = record_activations(tiny, inputs, include=r"^(conv|split)$")
    assert set(arrays) == {
        "input0",
        "input1",
        "output",
        "act/conv",
        "act/conv#1",
        "act/split[0]",
        "act/split[1]",
    }


def test_hooks_removed_when_forward_fails(tiny, inputs):
    with pytest.raises(RuntimeError):
        record_activations(tiny, [inputs[0], inputs[1][..., :2]])
    assert all(not m._forward_hooks for m in tiny.modules())


def test_importing_mgdn_jax_does_not_import_torch():
    code = "import sys, mgdn_jax.torch_hooks; assert 'torch' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )
