"""MGDN-JAX: the Mutual-Guided Dynamic Network for image fusion in JAX / Flax NNX."""

from mgdn_jax.model import MGDN, build_model

__all__ = ["MGDN", "build_model"]
