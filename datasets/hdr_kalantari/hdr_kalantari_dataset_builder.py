"""Kalantari & Ramamoorthi (SIGGRAPH 2017) dynamic-scene HDR set: per scene three 16-bit LDR
frames with moving content (short, medium = reference, long exposure), their exposures in EV
stops, and the linear HDR ground truth aligned to the middle frame.

Stored as LDRs (uint16), EV stops and the HDR target (float32); the input pipeline builds the
6-channel network inputs (LDR || LDR^gamma / 2^EV).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tifffile
from mgdn_datasets import common

from mgdn_jax import radiance

SPLITS = {"train": "Training", "test": "Test"}
EXPOSURE_FILE = "exposure.txt"
TARGET_FILE = "HDRImg.hdr"
NUM_FRAMES = 3
TIFF_SUFFIXES = (".tif", ".tiff")


class Builder(common.ManualBuilder):
    """`hdr_kalantari`: `ldr` (3, H, W, 3) uint16, `exposure_ev` (3,), `target` (H, W, 3) float32
    linear HDR, `name` (scene path relative to the split folder)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Training/SCENE/*.tif        three 16-bit RGB LDR frames; sorted names give the exposure order
  Training/SCENE/exposure.txt three numbers: each frame's exposure in EV stops (t = 2^EV)
  Training/SCENE/HDRImg.hdr   Radiance RGBE ground truth, aligned to the middle frame
  Test/SCENE/...              the same; scenes may sit one level deeper (Test/PAPER/SCENE/)
A scene is any folder holding exposure.txt; each present one of Training/ and Test/ is a split.
"""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "ldr": tfds.features.Tensor(
                        shape=(NUM_FRAMES, None, None, 3), dtype=np.uint16, encoding="bytes"
                    ),
                    "exposure_ev": tfds.features.Tensor(shape=(NUM_FRAMES,), dtype=np.float32),
                    "target": tfds.features.Tensor(
                        shape=(None, None, 3), dtype=np.float32, encoding="bytes"
                    ),
                    "name": tfds.features.Text(),
                }
            ),
            homepage="https://cseweb.ucsd.edu/~viscomp/projects/SIG17HDR/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        present = {
            split: root / folder for split, folder in SPLITS.items() if (root / folder).is_dir()
        }
        if not present:
            raise self.layout_error(root, f"{root / SPLITS['train']}/")
        return {
            split: self._generate_examples(self._scenes(root, folder))
            for split, folder in present.items()
        }

    def _scenes(self, root: Path, folder: Path) -> list[tuple[str, list[Path], Path]]:
        """(name relative to `folder`, LDR frames, scene directory) for every scene under
        `folder`."""
        scenes = sorted(path.parent for path in folder.rglob(EXPOSURE_FILE))
        if not scenes:
            raise self.layout_error(root, folder / "SCENE" / EXPOSURE_FILE)
        found = []
        for scene in scenes:
            if not (scene / TARGET_FILE).is_file():
                raise self.layout_error(root, scene / TARGET_FILE)
            frames = sorted(p for p in scene.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
            if len(frames) != NUM_FRAMES:
                raise self.layout_error(
                    root, f"{scene}/*.tif (expected {NUM_FRAMES} LDR frames, found {len(frames)})"
                )
            found.append((scene.relative_to(folder).as_posix(), frames, scene))
        return found

    def _generate_examples(
        self, scenes: list[tuple[str, list[Path], Path]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, frame_paths, scene in scenes:
            frames = {path: _read_ldr(path) for path in frame_paths}
            target_path = scene / TARGET_FILE
            try:
                target = radiance.read_hdr(target_path)
            except (OSError, ValueError) as error:
                raise common.CorruptDataError(str(error)) from error
            common.check_finite(target_path, target, nonnegative=True)
            sizes = {path: frame.shape[:2] for path, frame in frames.items()}
            common.check_same_size({**sizes, target_path: target.shape[:2]})
            yield (
                name,
                {
                    "ldr": np.stack(list(frames.values())),
                    "exposure_ev": _read_exposures(scene / EXPOSURE_FILE),
                    "target": target,
                    "name": name,
                },
            )


def _read_ldr(path: Path) -> np.ndarray:
    """A 16-bit RGB TIFF -> (H, W, 3) uint16."""
    try:
        frame = tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise common.CorruptDataError(f"{path}: unreadable TIFF ({error})") from error
    if frame.dtype != np.uint16 or frame.ndim != 3 or frame.shape[2] != 3:
        raise common.CorruptDataError(
            f"{path}: expected a 16-bit RGB image, got {frame.dtype} of shape {frame.shape}"
        )
    return frame


def _read_exposures(path: Path) -> np.ndarray:
    """`exposure.txt`: NUM_FRAMES EV stops -> (NUM_FRAMES,) float32."""
    try:
        values = np.array(path.read_text().split(), dtype=np.float32)
    except ValueError as error:
        raise common.CorruptDataError(f"{path}: not a list of numbers ({error})") from error
    if values.shape != (NUM_FRAMES,):
        raise common.CorruptDataError(f"{path}: expected {NUM_FRAMES} exposures, got {values.size}")
    common.check_finite(path, values)
    return values
