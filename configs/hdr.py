"""HDR deghosting (Kalantari 2017): three LDR frames, the middle one the reference."""

import ml_collections
from ml_collections import config_dict

from mgdn_jax.train_lib import training_defaults
from mgdn_jax.variants import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = training_defaults("hdr")
    config.model = model_config("hdr")
    config.data = ml_collections.ConfigDict(
        dict(
            train_dataset="hdr_kalantari",
            train_split="train",
            data_dir=config_dict.placeholder(str),
            patch_size=128,
            gamma=2.2,
            global_batch=4,
            seed=0,
            num_workers=4,
            read_threads=2,
            # A decoded Kalantari scene is ~45 MB: keep few in flight per worker.
            prefetch_buffer=8,
        )
    )
    config.eval.dataset = "hdr_kalantari"
    # The release's config.yaml: batch 4 of 128 x 128 crops, learning rate 1e-4. Its schedule
    # (x0.5 after epoch 8000, x0.1 after 12000) counts epochs of a training list it does not
    # ship, so the default cosine decay stands in for it.
    config.total_steps = 100_000
    config.optimizer.learning_rate = 1e-4
    return config
