"""NYU Depth v2 (labelled set, 1449 indoor RGB-D frames of 640x480) for guided depth
super-resolution, in the standard split: frames 0-999 train, 1000-1448 test.

Stores the RGB frame and the metric depth (float32 metres). The low-resolution input of any
scale (x4, x8, x16) is made by the input pipeline (`config.data.scale`): min/max-normalised
depth, bicubic downsampling, then bicubic upsampling back to full size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from mgdn_datasets import common

NUM_TRAIN = 1000


class Builder(common.ManualBuilder):
    """`gdsr_nyuv2`: `rgb` (H, W, 3) uint8, `depth` (H, W) float32 metres, `name` (frame id)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  RGB/ID.jpg     RGB frame ID, an integer (0-1448 for the labelled set; jpg/jpeg/png/tif/bmp)
  Depth/ID.npy   its depth: (H, W) float32 metres, same size as the RGB frame
Frames with ID < {NUM_TRAIN} form `train`, the others `test`.
"""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "rgb": tfds.features.Image(shape=(None, None, 3)),
                    "depth": tfds.features.Tensor(
                        shape=(None, None), dtype=np.float32, encoding="bytes"
                    ),
                    "name": tfds.features.Text(),
                }
            ),
            homepage="https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        rgb_dir, depth_dir = self.require_dir(root, "RGB"), self.require_dir(root, "Depth")
        images = common.list_images(rgb_dir)
        if not images:
            raise self.layout_error(root, common.missing_image(rgb_dir, "0"))
        frames: dict[str, list[tuple[str, Path, Path]]] = {"train": [], "test": []}
        for stem, rgb_path in sorted(images.items(), key=lambda item: _frame_id(item[1])):
            depth_path = depth_dir / f"{stem}.npy"
            if not depth_path.is_file():
                raise self.layout_error(root, depth_path)
            split = "train" if _frame_id(rgb_path) < NUM_TRAIN else "test"
            frames[split].append((stem, rgb_path, depth_path))
        return {split: self._generate_examples(items) for split, items in frames.items() if items}

    def _generate_examples(
        self, frames: list[tuple[str, Path, Path]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, rgb_path, depth_path in frames:
            rgb, size = common.rgb8_bytes(rgb_path)
            depth = _read_depth(depth_path)
            common.check_same_size({rgb_path: size, depth_path: depth.shape})
            yield name, {"rgb": rgb, "depth": depth, "name": name}


def _frame_id(path: Path) -> int:
    if not path.stem.isdigit():
        raise common.CorruptDataError(f"{path}: the file name must be an integer frame id")
    return int(path.stem)


def _read_depth(path: Path) -> np.ndarray:
    """A depth `.npy` -> (H, W) float32; finite, non-negative and not constant."""
    try:
        depth = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise common.CorruptDataError(f"{path}: unreadable depth map ({error})") from error
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
        raise common.CorruptDataError(
            f"{path}: expected a (H, W) float depth map, got {depth.dtype} of shape {depth.shape}"
        )
    depth = depth.astype(np.float32)
    common.check_finite(path, depth, nonnegative=True)
    if depth.max() <= depth.min():
        raise common.CorruptDataError(f"{path}: constant depth map, cannot be min/max-normalised")
    return depth
