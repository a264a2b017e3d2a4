"""MGDN-JAX: the Mutual-Guided Dynamic Network for image fusion in JAX / Flax NNX.

Submodules are imported on use (`from mgdn_jax.model import build_model`), so that light users
such as input-pipeline worker processes do not pay for importing JAX and Flax.
"""
