"""The embedded default: the released MFF architecture trained on `synthetic_fusion/mff`, which
is generated from scikit-image's bundled photographs (no download) on first use."""

import ml_collections
from ml_collections import config_dict

from mgdn_jax.variants import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model = model_config("mff")
    config.data = ml_collections.ConfigDict(
        dict(
            train_dataset="synthetic_fusion/mff",
            train_split="train",
            eval_dataset="synthetic_fusion/mff",
            eval_split="test",
            data_dir=config_dict.placeholder(str),
            patch_size=64,
            global_batch=4,
            seed=0,
            num_workers=0,
            read_threads=2,
            prefetch_buffer=8,
        )
    )
    return config
