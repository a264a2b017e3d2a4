"""MEF benchmark: under- and over-exposed RGB pairs of static scenes, for evaluation (`test`).

No ground truth exists. Sizes vary from pair to pair (both images of a pair match).
"""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds
from mgdn_datasets import common


class Builder(common.FusionBuilder):
    """`mef_benchmark`: `source_1` = under-exposed, `source_2` = over-exposed, `name`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  under/NAME_A.tif   under-exposed image of scene NAME (any of jpg/jpeg/png/tif/tiff/bmp)
  over/NAME_B.tif    over-exposed image of the same scene
"""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=common.fusion_features(target=False),
            homepage="https://github.com/xingchenzhang/MEFB",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        dirs = {
            "source_1": (self.require_dir(root, "under"), "_A"),
            "source_2": (self.require_dir(root, "over"), "_B"),
        }
        return {"test": self._generate_examples(common.match_images(self, root, dirs))}
