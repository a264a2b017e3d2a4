"""Lytro multi-focus test set: 20 pairs of 520x520 RGB images, each focused at another depth.

No ground truth exists; the set is for evaluation only (`test` split).
"""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds
from mgdn_datasets import common


class Builder(common.FusionBuilder):
    """`mff_lytro`: `source_1` = A, `source_2` = B (the two focal settings), `name`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  A/lytro_01.jpg ... A/lytro_20.jpg   first sources (any of jpg/jpeg/png/tif/tiff/bmp)
  B/lytro_01.jpg ... B/lytro_20.jpg   second sources, same stems as in A/
"""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=common.fusion_features(target=False),
            homepage="https://mansournejati.ece.iut.ac.ir/content/lytro-multi-focus-dataset",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        a_dir, b_dir = self.require_dir(root, "A"), self.require_dir(root, "B")
        pairs = common.match_images(self, root, {"source_1": (a_dir, ""), "source_2": (b_dir, "")})
        return {"test": self._generate_examples(pairs)}
