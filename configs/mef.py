"""Multi-exposure fusion (MEF): under- and over-exposed RGB pairs."""

import ml_collections
from ml_collections import config_dict

from mgdn_jax.train_lib import apply_release_fusion_training, training_defaults
from mgdn_jax.variants import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = training_defaults("mef")
    config.model = model_config("mef")
    config.data = ml_collections.ConfigDict(
        dict(
            train_dataset="mef_sice",
            train_split="train",
            data_dir=config_dict.placeholder(str),
            patch_size=128,
            global_batch=8,
            seed=0,
            num_workers=4,
            read_threads=4,
            prefetch_buffer=32,
        )
    )
    config.eval.dataset = "mef_benchmark"
    config.total_steps = 100_000
    apply_release_fusion_training(config)
    return config
