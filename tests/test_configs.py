"""configs/: the release's training settings where it states them."""

from __future__ import annotations

import pytest
from dataset_fixtures import load_config

from mgdn_jax import train_lib


def test_hdr_batch_patch_and_learning_rate_of_the_release():
    config = load_config("hdr")
    assert (config.data.global_batch, config.data.patch_size) == (4, 128)
    schedule = train_lib.learning_rate_schedule(config.optimizer, config.total_steps)
    assert float(schedule(config.optimizer.warmup_steps)) == pytest.approx(1e-4)


@pytest.mark.parametrize("scale", ["4", "8", "16"])
def test_gdsr_schedule_of_the_release(scale: str):
    """Batch 4 of 256^2, 1e-4 halved after epochs 1000 and 1100 of 1200 (250 steps each)."""
    config = load_config("gdsr", scale)
    assert (config.data.global_batch, config.data.patch_size) == (4, 256)
    assert config.data.scale == int(scale) and config.total_steps == 1200 * 250
    schedule = train_lib.learning_rate_schedule(config.optimizer, config.total_steps)
    epochs = {0: 1e-4, 999: 1e-4, 1000: 5e-5, 1099: 5e-5, 1100: 2.5e-5, 1199: 2.5e-5}
    for epoch, lr in epochs.items():
        assert float(schedule(epoch * 250)) == pytest.approx(lr), epoch
