"""Multi-focus fusion (MFF): the released pretrained architecture (62000 iterations)."""

import ml_collections

from mgdn_jax.variants import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model = model_config("mff")
    config.data = ml_collections.ConfigDict(
        dict(train_dataset="mff_realmff", eval_dataset="mff_lytro", patch_size=128)
    )
    return config
