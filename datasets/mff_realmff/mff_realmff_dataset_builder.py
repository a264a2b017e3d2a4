"""Multi-focus pairs with all-in-focus references, arranged like RealMFF or MFI-WHU.

Config `with_reference` (default) stores `target` for every pair; `without_reference` stores
the two sources only, for sets that have no references.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow_datasets as tfds
from mgdn_datasets import common

SPLITS = ("train", "test")


@dataclasses.dataclass
class RealMffConfig(tfds.core.BuilderConfig):
    """`reference`: whether each pair has an all-in-focus image in `GT/`."""

    reference: bool = True


class Builder(common.FusionBuilder):
    """`mff_realmff`: `source_1` = A, `source_2` = B, `target` = GT (with references), `name`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        RealMffConfig(name="with_reference", description="Pairs with an all-in-focus target."),
        RealMffConfig(name="without_reference", reference=False, description="Pairs only."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  train/A/NAME.png    first source of each training pair (any of jpg/jpeg/png/tif/tiff/bmp)
  train/B/NAME.png    second source, same stem as in A/
  train/GT/NAME.png   all-in-focus reference (config with_reference only)
  test/A/ test/B/ test/GT/   the same for the test pairs
At least one of train/ and test/ must exist; each present one becomes a split.
"""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=common.fusion_features(target=self.builder_config.reference),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        splits = [split for split in SPLITS if (root / split).is_dir()]
        if not splits:
            raise self.layout_error(root, f"{root / SPLITS[0]}/")
        folders = {"source_1": "A", "source_2": "B"}
        if self.builder_config.reference:
            folders["target"] = "GT"
        return {
            split: self._generate_examples(
                common.match_images(
                    self,
                    root,
                    {
                        key: (self.require_dir(root, f"{split}/{folder}"), "")
                        for key, folder in folders.items()
                    },
                )
            )
            for split in splits
        }
