"""configs/: the release's training settings where it states them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
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


@pytest.mark.parametrize("name", ["mff", "mef"])
def test_fusion_configs_train_as_the_release_code_does(name: str):
    """Adam without weight decay or clipping, and the moving average the released "E" weights
    are (model_plain.py)."""
    config = load_config(name)
    assert config.ema_decay == 0.999
    opt = config.optimizer
    assert (opt.name, opt.weight_decay, opt.grad_clip_norm) == ("adam", 0.0, 0.0)
    opt = opt.copy_and_resolve_references()
    opt.warmup_steps = 0  # a non-zero learning rate at the first step
    tx, schedule = train_lib.create_optimizer(opt, config.total_steps)
    params = {"kernel": jnp.ones((2, 2)), "still": jnp.ones((2, 2))}
    grads = {"kernel": jnp.full((2, 2), 3.0), "still": jnp.zeros((2, 2))}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Without weight decay a zero gradient moves nothing; Adam's first step is -lr * sign(g).
    assert float(schedule(0)) > 0
    np.testing.assert_array_equal(updates["still"], 0.0)
    np.testing.assert_allclose(updates["kernel"], -float(schedule(0)), rtol=1e-5)
