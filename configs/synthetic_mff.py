"""The embedded default: the released MFF architecture trained on `synthetic_fusion/mff`, which
is generated from scikit-image's bundled photographs (no download) on first use."""

import ml_collections
from ml_collections import config_dict

from mgdn_jax.train_lib import training_defaults
from mgdn_jax.variants import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = training_defaults("mff")
    config.model = model_config("mff")
    config.data = ml_collections.ConfigDict(
        dict(
            train_dataset="synthetic_fusion/mff",
            train_split="train",
            data_dir=config_dict.placeholder(str),
            patch_size=64,
            global_batch=4,
            seed=0,
            num_workers=0,
            read_threads=2,
            prefetch_buffer=8,
        )
    )
    config.eval.dataset = "synthetic_fusion/mff"
    # Small enough for a 2-core CPU: 32x32 patches, ~1.2 s per step there (64x64: ~6 s), about
    # 6 minutes in all.
    config.data.patch_size = 32
    config.total_steps = 240
    config.optimizer.update(learning_rate=1e-3, warmup_steps=20)
    config.log_every = 10
    config.eval_every = 240
    config.checkpoint_every = 80
    return config
