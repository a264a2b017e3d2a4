"""Recording of PyTorch module outputs into an activation file that `mgdn-parity` reads.

    from mgdn_jax.torch_hooks import record_activations
    official.eval()
    record_activations(official, [under, over], "activations.npz", include=r"^layers\\.0\\.")

The .npz holds one array per key:

- `input0`, `input1`, ...: the inputs as given (NHWC for images);
- `output`: what the module returned (`output[i]` for each element of a list or tuple);
- `act/<module name>`: the output of the submodule of that dotted name (as in
  `named_modules()`); `act/<name>[i]` for each element of a list or tuple output; a submodule
  called more than once stores its first call as `act/<name>`, then `act/<name>#1`,
  `act/<name>#2`, ... (so `act/<name>#1[0]` is element 0 of the second call).

Four-dimensional tensors are stored NHWC (converted from PyTorch's NCHW); every other tensor
keeps its PyTorch layout, e.g. tokens (B, H*W, C). Outputs that are not tensors are skipped.
PyTorch is imported only when recording, so `mgdn_jax` itself never needs it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as NumPy; (B, C, H, W) becomes (B, H, W, C)."""
    array = tensor.detach().cpu().numpy()
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def _store(arrays: dict[str, np.ndarray], key: str, value: Any) -> None:
    """Stores a tensor under `key`, or each tensor element of a list/tuple under `key[i]`."""
    import torch

    if isinstance(value, torch.Tensor):
        arrays[key] = _to_numpy(value)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                arrays[f"{key}[{i}]"] = _to_numpy(item)


def _write_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Writes `path` atomically: a temporary file in the same directory, then a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def record_activations(
    module: Any,
    inputs: Sequence[np.ndarray],
    path: str | Path | None = None,
    include: str | None = None,
) -> dict[str, np.ndarray]:
    """Runs `module(*inputs)` once without gradients, recording submodule outputs.

    Args:
        module: any `torch.nn.Module`, in the mode it should run in (call `.eval()` first for
            inference activations).
        inputs: NumPy arrays; (B, H, W, C) images are passed to the module as (B, C, H, W)
            tensors, arrays of any other rank unchanged. They are stored as given.
        path: if given, the .npz file to write (see the module docstring for its keys).
        include: if given, only submodules whose dotted name matches this regex (`re.search`)
            are recorded; by default every named submodule except the root.

    Returns:
        The recorded arrays, keyed as in the file.
    """
    import torch

    pattern = re.compile(include) if include is not None else None
    arrays = {f"input{i}": np.asarray(x) for i, x in enumerate(inputs)}
    calls: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            n = calls.get(name, 0)
            calls[name] = n + 1
            _store(arrays, f"act/{name}" if n == 0 else f"act/{name}#{n}", output)

        return hook

    handles = [
        sub.register_forward_hook(hook_for(name))
        for name, sub in module.named_modules()
        if name and (pattern is None or pattern.search(name))
    ]
    tensors = [
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x))
        for x in map(np.asarray, inputs)
    ]
    try:
        with torch.no_grad():
            output = module(*tensors)
    finally:
        for handle in handles:
            handle.remove()
    _store(arrays, "output", output)
    if path is not None:
        _write_npz(arrays, Path(path))
    return arrays
