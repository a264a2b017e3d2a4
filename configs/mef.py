"""Multi-exposure fusion (MEF): under- and over-exposed RGB pairs."""

import ml_collections

from mgdn_jax.variants import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model = model_config("mef")
    config.data = ml_collections.ConfigDict(
        dict(train_dataset="mef_sice", eval_dataset="mef_benchmark", patch_size=128)
    )
    return config
