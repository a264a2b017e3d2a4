"""HDR deghosting (Kalantari 2017): three LDR frames, the middle one the reference."""

import ml_collections

from mgdn_jax.variants import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model = model_config("hdr")
    config.data = ml_collections.ConfigDict(
        dict(train_dataset="hdr_kalantari", eval_dataset="hdr_kalantari", patch_size=128, gamma=2.2)
    )
    return config
