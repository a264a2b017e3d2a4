"""RGB-guided depth super-resolution (NYU v2). `arg` picks the scale: "4" (default), "8", "16";
x16 uses the width-60 model."""

import ml_collections

from mgdn_jax.variants import model_config

SCALES = (4, 8, 16)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    scale = int(arg or 4)
    if scale not in SCALES:
        raise ValueError(f"GDSR scale must be one of {SCALES}, got {arg!r}")
    config = ml_collections.ConfigDict()
    config.model = model_config("gdsr16" if scale == 16 else "gdsr")
    config.data = ml_collections.ConfigDict(
        dict(train_dataset="gdsr_nyuv2", eval_dataset="gdsr_nyuv2", patch_size=256, scale=scale)
    )
    return config
