"""SICE multi-exposure sequences as (under-exposed, over-exposed, reference) triplets.

SICE (Cai et al., TIP 2018) ships exposure sequences of static scenes with a reference image
per sequence. From each sequence the darkest and the brightest frame (by mean intensity) become
the under- and over-exposed sources; the reference is the target. Part 1 is the training split,
Part 2 the test split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from mgdn_datasets import common

PARTS = {"train": "Dataset_Part1", "test": "Dataset_Part2"}
LABEL_DIR = "Label"


class Builder(common.ManualBuilder):
    """`mef_sice`: `source_1` = under-exposed, `source_2` = over-exposed, `target`, `name`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Dataset_Part1/SEQ/1.JPG ... SEQ/N.JPG   exposure sequence SEQ, N >= 2 (jpg/jpeg/png/tif/tiff/bmp)
  Dataset_Part1/Label/SEQ.JPG             reference image of sequence SEQ
  Dataset_Part2/...                       the same; Part1 becomes `train`, Part2 `test`
At least one of Dataset_Part1/ and Dataset_Part2/ must exist.
"""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=common.fusion_features(target=True),
            homepage="https://github.com/csjcai/SICE",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        present = {split: root / part for split, part in PARTS.items() if (root / part).is_dir()}
        if not present:
            raise self.layout_error(root, f"{root / PARTS['train']}/")
        return {
            split: self._generate_examples(self._sequences(root, part))
            for split, part in present.items()
        }

    def _sequences(self, root: Path, part: Path) -> list[tuple[str, list[Path], Path]]:
        """(sequence name, its frames, its reference) for every sequence folder of `part`."""
        labels = common.list_images(self.require_dir(root, f"{part.name}/{LABEL_DIR}"))
        folders = sorted(p for p in part.iterdir() if p.is_dir() and p.name != LABEL_DIR)
        if not folders:
            raise self.layout_error(root, f"{part}/SEQ/")
        sequences = []
        for folder in folders:
            frames = list(common.list_images(folder).values())
            if len(frames) < 2:
                raise self.layout_error(root, common.missing_image(folder, str(len(frames) + 1)))
            if folder.name not in labels:
                raise self.layout_error(root, common.missing_image(part / LABEL_DIR, folder.name))
            sequences.append((folder.name, frames, labels[folder.name]))
        return sequences

    def _generate_examples(
        self, sequences: list[tuple[str, list[Path], Path]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, frames, label in sequences:
            brightness = {path: common.read_rgb8(path).mean() for path in frames}
            under = min(frames, key=brightness.__getitem__)
            over = max(frames, key=brightness.__getitem__)
            if under == over:
                raise common.CorruptDataError(
                    f"{label.parent.parent / name}: all frames are equally bright"
                )
            paths = {"source_1": under, "source_2": over, "target": label}
            yield name, common.fusion_example(name, paths)
