"""RGB-guided depth super-resolution (NYU v2). `arg` picks the scale: "4" (default), "8", "16";
x16 uses the width-60 model."""

import ml_collections
from ml_collections import config_dict

from mgdn_jax.train_lib import training_defaults
from mgdn_jax.variants import model_config

SCALES = (4, 8, 16)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    scale = int(arg or 4)
    if scale not in SCALES:
        raise ValueError(f"GDSR scale must be one of {SCALES}, got {arg!r}")
    config = training_defaults("gdsr")
    config.model = model_config("gdsr16" if scale == 16 else "gdsr")
    config.data = ml_collections.ConfigDict(
        dict(
            train_dataset="gdsr_nyuv2",
            train_split="train",
            data_dir=config_dict.placeholder(str),
            patch_size=256,
            scale=scale,
            global_batch=4,
            seed=0,
            num_workers=4,
            read_threads=4,
            prefetch_buffer=32,
        )
    )
    config.eval.dataset = "gdsr_nyuv2"
    # The release's script arguments: batch 4, learning rate 1e-4 halved at epochs 1000 and 1100
    # of 1200; an epoch is the 1000 NYU v2 training images, 250 steps.
    config.total_steps = 1200 * 250
    config.optimizer.update(
        learning_rate=1e-4,
        warmup_steps=0,
        schedule="step",
        decay_steps=(1000 * 250, 1100 * 250),
        decay_factor=0.5,
    )
    return config
