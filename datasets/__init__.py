"""TFDS builders for MGDN's four fusion tasks, installed as `mgdn_datasets` (the repository keeps
them in `datasets/`, one folder per dataset, the layout `tfds build` understands).

Importing this package registers every builder with TFDS, so `tfds.builder("mff_lytro")` and
`tfds.data_source("synthetic_fusion/mff")` find them. Builders write array_record and are read
with `tfds.data_source`: TensorFlow is never needed. Prepare one with
`python -m mgdn_datasets.build NAME --manual_dir DIR` (the flags of `tfds build`).
"""

from mgdn_datasets.gdsr_nyuv2.gdsr_nyuv2_dataset_builder import Builder as GdsrNyuv2
from mgdn_datasets.hdr_kalantari.hdr_kalantari_dataset_builder import Builder as HdrKalantari
from mgdn_datasets.mef_benchmark.mef_benchmark_dataset_builder import Builder as MefBenchmark
from mgdn_datasets.mef_sice.mef_sice_dataset_builder import Builder as MefSice
from mgdn_datasets.mff_lytro.mff_lytro_dataset_builder import Builder as MffLytro
from mgdn_datasets.mff_realmff.mff_realmff_dataset_builder import Builder as MffRealmff
from mgdn_datasets.synthetic_fusion.synthetic_fusion_dataset_builder import (
    Builder as SyntheticFusion,
)

__all__ = [
    "GdsrNyuv2",
    "HdrKalantari",
    "MefBenchmark",
    "MefSice",
    "MffLytro",
    "MffRealmff",
    "SyntheticFusion",
]
